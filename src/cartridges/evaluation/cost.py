"""What a method costs at serving time: prefill latency and decoding throughput.

KV bytes are exact (:attr:`Method.kv_bytes`); times are measured here on whatever device the model
is on. Decoding is timed on the path the server takes
(:func:`cartridges.decoding.continuous.complete`, one copy of the prefix for all rows;
:func:`cartridges.generation.generate` for a model that cannot share one), from the step that
produced each row's first token to the last step, so that one call gives the throughput and the
prompt's prefill does not count as decoding. Computing an in-context prefix takes seconds on a long
corpus: it is timed once, when the method is built (:attr:`Method.kv_seconds`), not recomputed here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from cartridges.decoding.continuous import Request, complete
from cartridges.decoding.shared_prefix import UnsupportedModelError
from cartridges.evaluation.methods import Method
from cartridges.generation import generate
from cartridges.initialization import kv_of_tokens
from cartridges.modeling import context_length, synchronize
from cartridges.prefix import forward_with_prefix


def measure_cost(
    model: PreTrainedModel,
    method: Method,
    prompt: Sequence[int],
    decode_tokens: int = 16,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 3,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """Prefill time and decode tokens/s of ``method`` for one question prompt.

    Returns:
        ``prefill_ms``: time to first token at batch 1 for a fresh question: computing the
        context's KV (in-context methods; a cartridge is stored, not computed) plus the prompt;
        ``decode_tok_s_b{B}``: generated tokens per second over ``B`` rows sharing the prefix
        (:func:`decode_rate`, after a short warm-up). ``repeats`` times the prompt's prefill.
    """

    @torch.no_grad()
    def prompt_prefill() -> None:
        cache = method.prefix.as_cache(1, model.config) if method.prefix is not None else None
        ids = torch.tensor([list(prompt)], device=model.device)
        forward_with_prefix(model, cache, ids, logits_to_keep=1)

    seconds = _median_seconds(model, prompt_prefill, repeats) + _context_seconds(
        model, method, repeats
    )
    costs = {"prefill_ms": 1000 * seconds}
    decode_tokens = _fitting(model, method, prompt, decode_tokens)
    if batch_sizes:  # warm-up, once: a batch of 16 prompts costs a long prefill for nothing
        decode_rate(model, method, [list(prompt)], min(decode_tokens, 2), pad_token_id)
    for batch in batch_sizes:
        rows = [list(prompt)] * batch
        costs[f"decode_tok_s_b{batch}"] = decode_rate(
            model, method, rows, decode_tokens, pad_token_id
        )
    return costs


def decode_rate(
    model: PreTrainedModel,
    method: Method,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_token_id: int = 0,
) -> float:
    """Tokens per second of ``prompts`` decoding ``new_tokens`` each after ``method``'s prefix.

    Every decoding step is timed (from the step of the first tokens, after the prefill, to the
    last) and the rate is the rows over the median step: one run gives ``new_tokens - 1``
    samples, and an outlier step (a collection, a page fault) does not move it. With one new
    token there is no decoding step, and the whole call, prefill included, is counted.
    """
    stamps: list[float] = []

    def stamp(*_: object) -> None:
        synchronize(model)
        stamps.append(time.perf_counter())

    stamp()
    try:
        requests = [
            Request(p, method.prefix, new_tokens, stop_token_ids=()) for p in prompts
        ]  # no stop token: every row decodes exactly new_tokens
        complete(
            model,
            requests,
            max_batch_size=len(prompts),
            pad_token_id=pad_token_id,
            on_step=stamp,
        )
    except UnsupportedModelError:
        stamps.clear()
        stamp()
        generate(
            model,
            prompts,
            prefix=method.prefix,
            max_new_tokens=new_tokens,
            pad_token_id=pad_token_id,
            stop_token_ids=(),
            on_step=stamp,
        )
    if new_tokens == 1:
        return len(prompts) / (stamps[-1] - stamps[0])
    steps = [later - earlier for earlier, later in zip(stamps[1:-1], stamps[2:], strict=True)]
    return len(prompts) / statistics.median(steps)


def _fitting(model: PreTrainedModel, method: Method, prompt: Sequence[int], tokens: int) -> int:
    """``tokens``, or fewer where the prefix and prompt leave the model less room: a rate is
    measured over the steps there are (an ICL context fills the model up to its answers)."""
    limit = context_length(model.config)
    if limit is None:
        return tokens
    room = limit - method.num_tokens - len(prompt) + 1
    return max(min(tokens, room), 1)


def _context_seconds(model: PreTrainedModel, method: Method, repeats: int) -> float:
    """Computing the method's in-context prefix: timed when built, else measured here."""
    if method.context_ids is None:
        return 0.0
    if method.kv_seconds is not None:
        return method.kv_seconds
    return _median_seconds(model, lambda: kv_of_tokens(model, method.context_ids), repeats)


def _median_seconds(model: PreTrainedModel, call: Callable[[], None], repeats: int) -> float:
    call()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(max(repeats, 1)):
        synchronize(model)
        start = time.perf_counter()
        call()
        synchronize(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
