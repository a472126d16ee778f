"""Continuous batching of decoding requests, each after its own KV prefix (a cartridge) or none.

A :class:`ContinuousBatcher` takes requests at any time (``add``, from any thread) and advances
them one ``step`` at a time: every running request decodes one token, all in ONE forward whatever
their prefixes and lengths, then the requests admitted since are prefilled together (one forward,
left-padded, each after its own prefix). A step reports each request's new token (with its
log-probability and top k when asked) and whether it finished (a stop token, or its
``max_new_tokens``); finished and cancelled requests leave the batch at once and waiting ones take
their place. A request's answer equals :func:`cartridges.generation.generate`'s for it alone.

Memory: each distinct prefix is stored once and each row holds only its own tokens
(:mod:`cartridges.decoding.ragged_cache`); attention merges the two parts exactly
(:mod:`cartridges.decoding.shared_prefix`). Admission is first come, first served within
``max_batch_size`` rows and a budget of KV tokens; it reserves a request's worst case (its prompt
and ``max_new_tokens``, plus its prefix unless a running row holds it already), so that a running
request never waits for memory and nothing is preempted.

Why not transformers' own continuous batching (``transformers.generation.continuous_batching``):
its ``add_request`` takes input ids only, so a request cannot start after a KV prefix that has no
token ids (a cartridge); its prefix sharing matches blocks of prompt tokens; and its sampling
settings belong to the manager, not to each request.

Not a server: streaming, parsing and threads are the caller's; ``step`` runs on the model's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel

from cartridges.cartridge import Cartridge
from cartridges.decoding.ragged_cache import KVMemory, RaggedCache, Row
from cartridges.decoding.shared_prefix import (
    BATCH_KWARG,
    UnsupportedModelError,
    attending_shared_prefix,
    check_calls,
)
from cartridges.generation import default_stop_ids, left_pad
from cartridges.modeling import context_length, kv_layout


@dataclass
class Request:
    """One prompt to continue after an optional prefix.

    Attributes:
        prompt: token ids (at least one) that follow the prefix.
        prefix: the KV prefix (a cartridge, or a document's KV), or ``None``.
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        generator: random source for sampling (CPU); ``seed`` makes one when it is ``None``.
        seed: seed of a new generator for this request.
        logprobs: report each token's log-probability.
        top_logprobs: report the ``k`` most likely tokens and their log-probabilities.
        stop_token_ids: tokens that end the request (kept in its answer). ``None``: the model's
            end of sequence (:func:`~cartridges.generation.default_stop_ids`); ``()``: none.
    """

    prompt: Sequence[int]
    prefix: Cartridge | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    generator: torch.Generator | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop_token_ids: Sequence[int] | None = None


@dataclass
class Token:
    """A request's new token from one step.

    Attributes:
        request_id: what :meth:`ContinuousBatcher.add` returned.
        token_id: the token.
        index: its place in the request's answer (0 for the first).
        logprob: its log-probability (``None`` unless asked).
        top_ids: the ``top_logprobs`` most likely ids at its position.
        top_logprobs: their log-probabilities.
        finish_reason: ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens``) on the
            request's last token, else ``None``.
    """

    request_id: int
    token_id: int
    index: int
    logprob: float | None = None
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StepFailed(RuntimeError):
    """A forward of :meth:`ContinuousBatcher.step` failed; its requests have left the batch.

    Attributes:
        request_ids: those requests (the others carry on at the next step).
        tokens: what the step produced for other requests before the failure.
    """

    def __init__(self, request_ids: list[int], error: Exception) -> None:
        super().__init__(f"Decoding requests {request_ids} failed ({error!r}); they were removed.")
        self.request_ids = request_ids
        self.tokens: list[Token] = []


@dataclass(eq=False)
class _Running:
    """A request admitted to the batch, with its row of the cache."""

    id: int
    request: Request
    row: Row
    stop: frozenset[int]
    generated: int = 0
    last_token: int = -1

    @property
    def reserved(self) -> int:
        return _own_tokens(self.request)


def _own_tokens(request: Request) -> int:
    """The KV tokens a request may come to hold itself: its prompt and all it may generate."""
    return len(request.prompt) + request.max_new_tokens


class ContinuousBatcher:
    """Decodes requests continuously, one shared copy of each KV prefix however many use it.

    Args:
        model: a frozen causal LM that attends through transformers' attention interface (checked
            here with a two-token forward; :class:`UnsupportedModelError` otherwise).
        max_batch_size: most requests decoding at once.
        kv_budget_tokens: most KV tokens held at once (stored prefixes plus the requests'
            reservations); ``None``: unbounded.
        pad_token_id: filler of left padding in a prefill (never attended to).
        block_size: own tokens per cache block
        (:class:`~cartridges.decoding.ragged_cache.RaggedCache`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch_size: int = 32,
        kv_budget_tokens: int | None = None,
        pad_token_id: int = 0,
        block_size: int = 16,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model = model
        self.max_batch_size = max_batch_size
        self.kv_budget_tokens = kv_budget_tokens
        self.pad_token_id = pad_token_id
        self.layout = kv_layout(model)
        self.cache = RaggedCache(self.layout, model.dtype, model.device, block_size)
        self._running: list[_Running] = []
        self._waiting: deque[tuple[int, Request]] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._next_id = 0
        self._check_model()

    # ------------------------------------------------------------------ requests
    def add(self, request: Request) -> int:
        """Queue ``request`` (checked now) and return its id; any thread may call this."""
        self._validate(request)
        generator = request.generator
        if generator is None and request.seed is not None:
            generator = torch.Generator().manual_seed(request.seed)
        stop = request.stop_token_ids
        request = replace(
            request,
            generator=generator,
            stop_token_ids=default_stop_ids(self.model) if stop is None else tuple(stop),
        )
        with self._lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._waiting.append((request_id, request))
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Withdraw a request: it leaves the batch before the next forward. ``False``: unknown."""
        with self._lock:
            for index, (waiting_id, _) in enumerate(self._waiting):
                if waiting_id == request_id:
                    del self._waiting[index]
                    return True
            if any(running.id == request_id for running in list(self._running)):
                self._cancelled.add(request_id)
                return True
        return False

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def memory(self) -> KVMemory:
        """What the cache holds now (each stored prefix once, the rows' own tokens)."""
        return self.cache.memory()

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[Token]:
        """Decode one token for every running request, then admit and prefill waiting ones.

        Raises :class:`StepFailed` when a forward fails (out of memory, say): the requests of that
        forward are then gone and the batcher carries on with the others.
        """
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for running in [r for r in self._running if r.id in cancelled]:
            self._leave(running)
        tokens: list[Token] = []
        try:
            if self._running:
                tokens += self._decode(list(self._running))
            admitted = self._admit()
            if admitted:
                tokens += self._prefill(admitted)
        except StepFailed as failure:
            failure.tokens = tokens
            raise
        return tokens

    def _decode(self, batch: list[_Running]) -> list[Token]:
        ids = torch.tensor([[r.last_token] for r in batch], device=self.model.device)
        return self._choose(batch, self._forward(batch, ids, None))

    def _prefill(self, batch: list[_Running]) -> list[Token]:
        prompts = [r.request.prompt for r in batch]
        ids, mask = left_pad(prompts, self.pad_token_id, self.model.device)
        return self._choose(batch, self._forward(batch, ids, mask))

    def _forward(self, batch: list[_Running], ids: torch.Tensor, mask: torch.Tensor | None):
        """The last position's logits ``[B, V]`` of one forward of ``batch`` (``ids [B, T]``)."""
        counts = mask.sum(dim=-1).tolist() if mask is not None else [1] * len(batch)
        try:
            cache = self.cache.step_cache([r.row for r in batch], counts, ids.shape[1])
            with attending_shared_prefix(self.model):
                outputs = self.model(
                    input_ids=ids,
                    attention_mask=mask,  # only read by models that look at padding themselves
                    position_ids=cache.batch.query_positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **{BATCH_KWARG: cache.batch},
                )
        except Exception as error:  # their rows hold positions they never wrote: retire them
            for running in batch:
                self._leave(running)
            raise StepFailed([running.id for running in batch], error) from error
        cache.keep_row_state()
        return outputs.logits[:, -1]

    def _choose(self, batch: list[_Running], logits: torch.Tensor) -> list[Token]:
        """Pick each row's token as ``generate`` does, report it, and retire finished rows.

        A sampled row draws from its own generator, one row at a time, as ``generate`` draws
        for a batch of one.
        """
        chosen = logits.argmax(dim=-1).tolist()
        for index, running in enumerate(batch):
            if (temperature := running.request.temperature) > 0:
                scaled = logits[index : index + 1].float() / temperature  # [1, V]
                probabilities = torch.softmax(scaled, dim=-1).cpu()
                draw = torch.multinomial(probabilities, 1, generator=running.request.generator)
                chosen[index] = int(draw)
        asking = [i for i, r in enumerate(batch) if r.request.logprobs or r.request.top_logprobs]
        if asking:
            logprobs = torch.log_softmax(logits[asking].float(), dim=-1)  # [A, V]
            k = max(batch[i].request.top_logprobs for i in asking)
            top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
            picked = logprobs.gather(-1, torch.tensor(chosen, device=logits.device)[asking, None])
        tokens = []
        for index, running in enumerate(batch):
            token = Token(running.id, chosen[index], running.generated)
            if index in asking:
                a, k = asking.index(index), running.request.top_logprobs
                token.logprob = float(picked[a, 0])
                if k:
                    token.top_ids = top_ids[a, :k].tolist()
                    token.top_logprobs = top_values[a, :k].tolist()
            tokens.append(self._advance(running, token))
        return tokens

    def _advance(self, running: _Running, token: Token) -> Token:
        running.generated += 1
        running.last_token = token.token_id
        if token.token_id in running.stop:
            token.finish_reason = "stop"
        elif running.generated >= running.request.max_new_tokens:
            token.finish_reason = "length"
        if token.finished:
            self._leave(running)
        return token

    def _leave(self, running: _Running) -> None:
        self._running.remove(running)
        self.cache.remove_row(running.row)

    # ------------------------------------------------------------------ admission
    def _admit(self) -> list[_Running]:
        """Waiting requests that fit now, first come first served (none jumps the queue)."""
        admitted: list[_Running] = []
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                request_id, request = self._waiting[0]
                if not self._fits(request):
                    break
                self._waiting.popleft()
                stop = frozenset(int(i) for i in request.stop_token_ids)
                running = _Running(request_id, request, self.cache.add_row(request.prefix), stop)
                self._running.append(running)
                admitted.append(running)
        return admitted

    def _fits(self, request: Request) -> bool:
        if self.kv_budget_tokens is None:
            return True
        held = self.cache.prefix_tokens + sum(r.reserved for r in self._running)
        return held + self._cost(request) <= self.kv_budget_tokens

    def _cost(self, request: Request) -> int:
        """KV tokens admitting ``request`` reserves: its own worst case, and its prefix if new."""
        prefix = 0 if self.cache.holds(request.prefix) else request.prefix.num_tokens
        return _own_tokens(request) + prefix

    def _validate(self, request: Request) -> None:
        """Refuse a request that could never run, quoting the offending values."""
        if len(request.prompt) == 0:
            raise ValueError("A request needs at least one prompt token to continue from.")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}.")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}.")
        vocabulary = self.model.config.get_text_config(decoder=True).vocab_size
        if not 0 <= request.top_logprobs <= vocabulary:
            raise ValueError(
                f"top_logprobs must lie in [0, {vocabulary}], got {request.top_logprobs}."
            )
        if request.prefix is not None:
            request.prefix.check_compatible(self.model)
        prefix_len = request.prefix.num_tokens if request.prefix is not None else 0
        span = prefix_len + len(request.prompt) + request.max_new_tokens - 1
        limit = context_length(self.model.config)
        if limit is not None and span > limit:
            raise ValueError(
                f"Prefix ({prefix_len}) + prompt ({len(request.prompt)}) + max_new_tokens "
                f"({request.max_new_tokens}) need {span} positions; the model has {limit}."
            )
        cost = _own_tokens(request) + prefix_len
        if self.kv_budget_tokens is not None and cost > self.kv_budget_tokens:
            raise ValueError(
                f"The request needs {cost} KV tokens (prefix {prefix_len} + prompt "
                f"{len(request.prompt)} + max_new_tokens {request.max_new_tokens}), more than "
                f"the whole budget of {self.kv_budget_tokens}."
            )

    def _check_model(self) -> None:
        """A two-token forward through the shared-prefix path; refuse what it cannot serve."""
        probe = RaggedCache(self.layout, self.model.dtype, self.model.device, num_blocks=1)
        row = probe.add_row(None)
        cache = probe.step_cache([row], [2], 2)
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.model.device)
        try:
            with torch.no_grad(), attending_shared_prefix(self.model):
                self.model(
                    input_ids=ids,
                    position_ids=cache.batch.query_positions,
                    cache=cache,
                    use_cache=True,
                    **{BATCH_KWARG: cache.batch},
                )
        except UnsupportedModelError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure means: decode another way
            raise UnsupportedModelError(
                f"Model '{self.model.name_or_path}' cannot run shared-prefix attention: {error}"
            ) from error
        check_calls(self.model, cache.batch, self.layout.num_layers)


def complete(
    model: PreTrainedModel,
    requests: Sequence[Request],
    *,
    max_batch_size: int = 32,
    pad_token_id: int = 0,
    on_step: Callable[[list[Token]], None] | None = None,
) -> list[list[Token]]:
    """Run ``requests`` to their end, continuously batched; each one's tokens, in request order.

    Offline decoding of many prompts (evaluation answers, cost timings) takes the serving path:
    one copy of each prefix whatever the number of rows, and a finished row's place goes to the
    next request at once instead of waiting for the longest row of a fixed batch.
    ``on_step`` sees each step's tokens as they come (progress, timings).

    Raises:
        UnsupportedModelError: the model's attention cannot run shared-prefix decoding (decode
            with :func:`cartridges.generation.generate` instead).
    """
    batcher = ContinuousBatcher(model, max_batch_size=max_batch_size, pad_token_id=pad_token_id)
    ids = [batcher.add(request) for request in requests]
    tokens: dict[int, list[Token]] = {request_id: [] for request_id in ids}
    while batcher.has_work:
        step = batcher.step()
        for token in step:
            tokens[token.request_id].append(token)
        if on_step is not None:
            on_step(step)
    return [tokens[request_id] for request_id in ids]
