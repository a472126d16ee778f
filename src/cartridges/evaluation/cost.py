"""What a method costs at serving time: prefill latency and decoding throughput.

KV bytes are exact (:attr:`Method.kv_bytes`); times are measured here, as the median of a few
repeats after a warm-up, on whatever device the model is on. Decoding throughput is measured with
:func:`cartridges.generation.generate` itself: the difference between ``n`` and ``1`` new tokens
per row, so that the prompt's prefill does not count as decoding.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from cartridges.evaluation.methods import Method
from cartridges.generation import generate
from cartridges.initialization import kv_of_tokens
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
        ``decode_tok_s_b{B}``: generated tokens per second over ``B`` rows sharing the prefix.
    """

    @torch.no_grad()
    def prefill() -> None:
        if method.context_ids is not None:
            kv_of_tokens(model, method.context_ids)
        cache = method.prefix.as_cache(1, model.config) if method.prefix is not None else None
        ids = torch.tensor([list(prompt)], device=model.device)
        forward_with_prefix(model, cache, ids, logits_to_keep=1)

    costs = {"prefill_ms": 1000 * _median_seconds(model, prefill, repeats)}
    for batch in batch_sizes:

        def run(new_tokens: int, batch: int = batch) -> None:
            generate(
                model,
                [prompt] * batch,
                prefix=method.prefix,
                max_new_tokens=new_tokens,
                pad_token_id=pad_token_id,
                stop_token_ids=(),  # time exactly new_tokens steps per row
            )

        full = _median_seconds(model, lambda: run(decode_tokens), repeats)
        first = _median_seconds(model, lambda: run(1), repeats)
        steps, seconds = decode_tokens - 1, full - first
        if steps <= 0 or seconds <= 0:  # too fast to separate: count the whole call
            steps, seconds = decode_tokens, full
        costs[f"decode_tok_s_b{batch}"] = batch * steps / seconds
    return costs


def _median_seconds(model: PreTrainedModel, call: Callable[[], None], repeats: int) -> float:
    call()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(max(repeats, 1)):
        _synchronize(model)
        start = time.perf_counter()
        call()
        _synchronize(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize(model: PreTrainedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
