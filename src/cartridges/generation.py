"""Batched decoding after a KV prefix, with the top-k log-probabilities of every token.

Why not ``model.generate``: it cannot take a prefix that has no input ids (a cartridge), and
self-study needs the teacher's top-k distribution at every generated position. This loop works
on token ids (a tokenizer is only consulted for its end-of-sequence id) and on any model that
speaks the standard cache API: the prefix is built once per batch, prompts are left-padded, and
each step feeds one token per row. Like ``model.generate``, a row stops at the model's end of
sequence unless the caller names other stop ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from cartridges.cartridge import Cartridge
from cartridges.modeling import sliding_window
from cartridges.prefix import forward_with_prefix, prefixed_mask


@dataclass
class Generation:
    """One generated continuation.

    Attributes:
        token_ids: generated ids, the stop token included when one was produced.
        stopped: ``True`` if a stop token ended it, ``False`` if ``max_new_tokens`` cut it.
        top_ids: ``(n, k)`` most likely token ids at each generated position (``k = 0``: none).
        top_logprobs: ``(n, k)`` their log-probabilities (float32).
    """

    token_ids: list[int]
    stopped: bool
    top_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.long))
    top_logprobs: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))


@dataclass
class Step:
    """The tokens that one decoding step chose, as ``generate`` hands them to ``on_step``.

    Only rows still decoding are listed, so each row's tokens over the steps are exactly its
    :attr:`Generation.token_ids`.

    Attributes:
        index: the step; a row's first generated token comes at step 0.
        rows: those rows, as indices into ``generate``'s ``prompts``.
        token_ids: ``(len(rows),)`` the token each of them chose (a stop token included).
        logprobs: ``(len(rows),)`` its log-probability (float32; empty when ``top_logprobs=0``).
        top_ids: ``(len(rows), k)`` the most likely ids at this position.
        top_logprobs: ``(len(rows), k)`` their log-probabilities.
    """

    index: int
    rows: list[int]
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class PreallocatedLayer(DynamicLayer):
    """A cache layer that writes new tokens into a preallocated buffer instead of concatenating.

    ``DynamicLayer`` copies the whole cache at every decoding step (``torch.cat``), which makes
    decoding quadratic in the length, and a shared prefix is copied once per row per step.
    This layer allocates ``capacity`` slots once; ``keys``/``values`` are views of the filled part.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]))
        end = self._length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"Preallocated cache of {self.capacity} slots overflowed ({end}).")
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values


def decoding_cache(
    model: PreTrainedModel, prefix: Cartridge | None, batch_size: int, capacity: int
) -> DynamicCache:
    """A cache holding ``prefix`` for every row, with room for ``capacity`` tokens per row.

    Full-attention layers get a preallocated buffer; other layer types (sliding windows) keep
    the model's own cache layer. A prefix made for another KV layout is refused here, before
    attention fails on its shapes.
    """
    if prefix is not None:
        prefix.check_layout(model)
    cache = prefix.as_cache(batch_size, model.config) if prefix is not None else None
    if cache is None:
        cache = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            continue
        fast = PreallocatedLayer(capacity)
        if layer.is_initialized and layer.get_seq_length() > 0:
            fast.update(layer.keys.detach(), layer.values.detach())
        cache.layers[index] = fast
    return cache


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` of shape ``(B, T)``."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence) :] = torch.tensor(list(sequence))
            attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _next_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return (
        torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    )


def default_stop_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[int]:
    """The ids that end a row unless a caller names its own: the model's end of sequence
    (``generation_config.eos_token_id``, one id or a list) and the tokenizer's, when given one.

    A chat model ends its turn with one of these; decoding past it produces text that belongs
    to no reply (the next turn's role token, or noise).
    """
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(decoder=True), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None})


@dataclass(frozen=True)
class _Decoding:
    """How ``generate`` decodes, as one value that its per-group calls pass on unchanged."""

    max_new_tokens: int
    temperature: float
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    top_logprobs: int
    generator: torch.Generator | None


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    prefix: Cartridge | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    stop_token_ids: Sequence[int] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    pad_token_id: int = 0,
    top_logprobs: int = 0,
    generator: torch.Generator | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> list[Generation]:
    """Continue each prompt after an optional shared prefix (a cartridge or a prefilled text).

    Args:
        model: a frozen causal LM.
        prompts: token ids per row; each row continues after the prefix.
        prefix: KV shared by every row, or ``None`` for no context. One made for a model with
            another KV layout is refused (:class:`~cartridges.cartridge.CartridgeMismatchError`).
        max_new_tokens: hard cap per row; rows cut by it come back with ``stopped=False``.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        stop_token_ids: tokens that end a row (kept in its output). ``None``: the model's end of
            sequence and ``tokenizer``'s (:func:`default_stop_ids`); ``()``: never stop early.
        tokenizer: only read for its end-of-sequence id when ``stop_token_ids`` is ``None``.
        pad_token_id: filler for finished rows and left padding (never attended to).
        top_logprobs: record the ``k`` most likely tokens and log-probabilities per position.
        generator: random source for sampling (CPU generator), for reproducible runs.
        on_step: called with each step's tokens as soon as they are chosen (before the next
            forward), so that a server can stream them; it runs on the decoding thread.
    """
    if not prompts:
        return []
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt needs at least one token to continue from.")
    if stop_token_ids is None:
        stop_token_ids = default_stop_ids(model, tokenizer)
    decoding = _Decoding(
        max_new_tokens,
        temperature,
        tuple(stop_token_ids),
        pad_token_id,
        top_logprobs,
        generator,
    )
    if sliding_window(model.config) is not None and len({len(p) for p in prompts}) > 1:
        # Left padding would shift the sliding windows: decode equal-length groups instead.
        groups: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(row)
        results: list[Generation | None] = [None] * len(prompts)
        for rows in groups.values():
            report = _in_rows(on_step, rows) if on_step is not None else None
            outputs = _decode(model, [prompts[r] for r in rows], prefix, decoding, report)
            for row, output in zip(rows, outputs, strict=True):
                results[row] = output
        return results
    return _decode(model, prompts, prefix, decoding, on_step)


def _decode(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    prefix: Cartridge | None,
    decoding: _Decoding,
    on_step: Callable[[Step], None] | None,
) -> list[Generation]:
    """The decoding loop of :func:`generate` for prompts that may share one left-padded batch."""
    batch_size, pad = len(prompts), decoding.pad_token_id
    input_ids, prompt_mask = left_pad(prompts, pad, model.device)
    prefix_len = prefix.num_tokens if prefix is not None else 0
    capacity = prefix_len + input_ids.shape[1] + decoding.max_new_tokens
    cache = decoding_cache(model, prefix, batch_size, capacity)
    outputs = forward_with_prefix(model, cache, input_ids, prompt_mask, logits_to_keep=1)
    cache = outputs.cache
    mask = prompt_mask
    stop = torch.tensor(sorted(set(decoding.stop_token_ids)), dtype=torch.long, device=model.device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=model.device)
    tokens, top_ids, top_values = [], [], []
    logits = outputs.logits[:, -1]
    for index in range(decoding.max_new_tokens):
        if decoding.top_logprobs:
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
            values, ids = logprobs.topk(decoding.top_logprobs, dim=-1)
            top_ids.append(ids.cpu())
            top_values.append(values.cpu())
        next_ids = _next_tokens(logits, decoding.temperature, decoding.generator)
        next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
        tokens.append(next_ids.cpu())
        if on_step is not None:
            chosen = (
                logprobs.gather(-1, next_ids[:, None]).squeeze(-1)
                if decoding.top_logprobs
                else None
            )
            on_step(_step(index, ~done, tokens[-1], chosen, top_ids, top_values))
        step_mask = (~done).long()
        done = done | torch.isin(next_ids, stop)
        if bool(done.all()) or index == decoding.max_new_tokens - 1:
            break  # no forward for a token that will not be chosen
        mask = torch.cat([mask, step_mask[:, None]], dim=-1)
        positions = prefix_len + mask.sum(dim=-1, keepdim=True) - 1
        outputs = model(
            input_ids=next_ids[:, None],
            attention_mask=prefixed_mask(prefix_len, mask),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache = outputs.cache
        logits = outputs.logits[:, -1]
    return _collect(tokens, top_ids, top_values, stop.cpu(), batch_size)


def _step(
    index: int,
    active: torch.Tensor,
    token_ids: torch.Tensor,
    chosen: torch.Tensor | None,
    top_ids: list[torch.Tensor],
    top_values: list[torch.Tensor],
) -> Step:
    """This step's tokens (and log-probabilities, when recorded) of the ``active`` rows."""
    rows = active.nonzero().squeeze(-1).cpu()
    if chosen is None:
        unrecorded = torch.empty(0, 0)
        return Step(index, rows.tolist(), token_ids[rows], torch.empty(0), unrecorded, unrecorded)
    return Step(
        index,
        rows.tolist(),
        token_ids[rows],
        chosen.cpu()[rows],
        top_ids[-1][rows],
        top_values[-1][rows],
    )


def _in_rows(on_step: Callable[[Step], None], rows: list[int]) -> Callable[[Step], None]:
    """``on_step`` for a sub-batch made of ``rows``: its row indices are mapped back."""

    def report(step: Step) -> None:
        on_step(replace(step, rows=[rows[row] for row in step.rows]))

    return report


def _collect(tokens, top_ids, top_values, stop, batch_size) -> list[Generation]:
    steps = torch.stack(tokens, dim=1)  # [B, n]
    ids_per_step = torch.stack(top_ids, dim=1) if top_ids else None  # [B, n, k]
    values_per_step = torch.stack(top_values, dim=1) if top_values else None
    results = []
    for row in range(batch_size):
        hits = torch.isin(steps[row], stop).nonzero()
        length = int(hits[0]) + 1 if len(hits) else steps.shape[1]
        generation = Generation(token_ids=steps[row, :length].tolist(), stopped=bool(len(hits)))
        if ids_per_step is not None:
            generation.top_ids = ids_per_step[row, :length]
            generation.top_logprobs = values_per_step[row, :length]
        results.append(generation)
    return results
