"""Serving a cartridge versus the same model with the document in context, measured in one run.

Two cases:

- ``cartridge``: a cartridge of ``p`` tokens as prefix;
- ``icl``: the ``n``-token document's KV as prefix (prefilled once, as a prefix-caching server
  would; prefill time is excluded from both cases).

Two measures:

1. Equal concurrency, with ``generate`` (one call per batch of concurrent requests, the prefix
   a broadcast view): decode tokens/s = rows x (N - 1) / (time(N new tokens) - time(1 new
   token)), best of a few repeats, at concurrency 1 and 16. KV memory per request is what each
   row's cache holds at the end, ``(prefix + question + N) x bytes per token``: ``generate``
   copies the shared prefix into each row's cache on its first decode step.
2. The paper's measure, peak decode throughput within a fixed KV memory budget
   (``--kv-budget-mb``), with :class:`~cartridges.continuous.ContinuousBatcher`, which stores
   each prefix once and reserves ``question + N`` tokens per request: each case runs at the
   largest concurrency the budget admits (the batcher's own admission decides). The default
   budget holds the document plus three ICL requests. Tokens/s = rows x (N - 1) / time of the
   N - 1 decode steps after the prefill. KV bytes per request are printed both ways: with the
   prefix shared (``prefix / rows + question + N``) and with a copy per row.

The model is a random 8-layer Llama of about 6M parameters built from a config (nothing is
downloaded). On the CPU it runs on ``--threads`` threads (default 1: on a shared machine more
threads mostly wait on each other). The last line printed is one JSON object with the headline
figures.

Usage: ``python benchmarks/serving.py [--n 2048] [--p 128] [--new-tokens 32] [--kv-budget-mb 8.6]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cartridges.continuous import ContinuousBatcher, Request
from cartridges.generation import generate
from cartridges.initialization import from_token_ids
from cartridges.modeling import kv_layout

logger = logging.getLogger("benchmark")
VOCAB = 2048
QUESTION_TOKENS = 16


def build_model(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(device).eval().requires_grad_(False)


def _time(model, prompts, prefix, new_tokens: int) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate(model, prompts, prefix=prefix, max_new_tokens=new_tokens, stop_token_ids=())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def decode_tokens_per_s(model, prefix, concurrency: int, new_tokens: int, repeats: int) -> float:
    """Decode throughput of ``concurrency`` requests batched into one ``generate`` call."""
    generator = torch.Generator().manual_seed(concurrency)
    prompts = torch.randint(3, VOCAB, (concurrency, QUESTION_TOKENS), generator=generator).tolist()
    _time(model, prompts, prefix, 2)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        decode = _time(model, prompts, prefix, new_tokens) - _time(model, prompts, prefix, 1)
        best = min(best, decode)
    return concurrency * (new_tokens - 1) / best


@dataclass
class BudgetRun:
    """Decoding within a KV budget: the concurrency admitted, its throughput, what it held."""

    concurrency: int
    tokens_per_s: float
    prefix_bytes: int  # the stored prefix, measured from the batcher's tensors
    own_bytes_per_request: int  # each request's own tokens, measured likewise


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def budget_run(model, prefix, budget_tokens: int, new_tokens: int) -> BudgetRun:
    """One cohort: as many requests as the budget admits, prefilled, then timed while decoding."""
    batcher = ContinuousBatcher(model, max_batch_size=1 << 20, kv_budget_tokens=budget_tokens)
    generator = torch.Generator().manual_seed(2)
    offered = budget_tokens // (QUESTION_TOKENS + new_tokens) + 1  # more than can fit
    prompts = torch.randint(3, VOCAB, (offered, QUESTION_TOKENS), generator=generator).tolist()
    ids = [
        batcher.add(Request(prompt, prefix, new_tokens, stop_token_ids=())) for prompt in prompts
    ]
    admitted = {token.request_id for token in batcher.step()}  # the prefill
    for request_id in set(ids) - admitted:  # time decoding only: nobody joins later
        batcher.cancel(request_id)
    _sync(model)
    started = time.perf_counter()
    for _ in range(new_tokens - 2):
        batcher.step()
    _sync(model)
    elapsed = time.perf_counter() - started
    memory = batcher.memory()  # before the last step, while every row still holds its tokens
    started = time.perf_counter()
    batcher.step()
    _sync(model)
    elapsed += time.perf_counter() - started
    return BudgetRun(
        len(admitted),
        len(admitted) * (new_tokens - 1) / elapsed,
        memory.prefix_bytes,
        memory.own_bytes // len(admitted),
    )


def best_budget_run(model, prefix, budget_tokens: int, new_tokens: int, repeats: int) -> BudgetRun:
    budget_run(model, prefix, budget_tokens, 3)  # warm-up
    runs = [budget_run(model, prefix, budget_tokens, new_tokens) for _ in range(repeats)]
    return max(runs, key=lambda run: run.tokens_per_s)


def equal_concurrency(model, prefixes, args, bytes_per_token: int) -> dict:
    """Measure 1: ``generate`` at concurrency 1 and 16; logs a line per case."""
    results = {}
    for name, prefix in prefixes.items():
        kv_per_request = (prefix.num_tokens + QUESTION_TOKENS + args.new_tokens) * bytes_per_token
        for concurrency in (1, 16):
            rate = decode_tokens_per_s(model, prefix, concurrency, args.new_tokens, args.repeats)
            results[(name, concurrency)] = (rate, kv_per_request)
            logger.info(
                "%9s  prefix %5d  c=%-3d decode %9.1f tok/s   KV/request %7.2f MiB   "
                "KV for all %8.2f MiB",
                name,
                prefix.num_tokens,
                concurrency,
                rate,
                kv_per_request / 2**20,
                concurrency * kv_per_request / 2**20,
            )
    return results


def within_budget(model, prefixes, args, bytes_per_token: int) -> dict[str, BudgetRun]:
    """Measure 2: the largest concurrency the KV budget admits, decoded continuously."""
    budget_tokens = int(args.kv_budget_mb * 2**20) // bytes_per_token
    runs = {}
    for name, prefix in prefixes.items():
        run = best_budget_run(model, prefix, budget_tokens, args.new_tokens, args.repeats)
        runs[name] = run
        own = (QUESTION_TOKENS + args.new_tokens) * bytes_per_token
        logger.info(
            "%9s  budget %.2f MiB (%d tokens): c=%-4d decode %9.1f tok/s   KV/request "
            "shared prefix %6.3f MiB (measured: prefix %.2f MiB once, own %.3f MiB), "
            "copy per row %6.3f MiB",
            name,
            args.kv_budget_mb,
            budget_tokens,
            run.concurrency,
            run.tokens_per_s,
            (prefix.kv_bytes / run.concurrency + own) / 2**20,
            run.prefix_bytes / 2**20,
            run.own_bytes_per_request / 2**20,
            (prefix.kv_bytes + own) / 2**20,
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="document tokens (ICL context)")
    parser.add_argument("--p", type=int, default=128, help="cartridge tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per request")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--kv-budget-mb", type=float, default=8.6, help="KV budget (MiB)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.n < 16 * args.p:
        parser.error(f"n/p must be >= 16; got n={args.n}, p={args.p}.")
    if args.new_tokens < 3:
        parser.error(f"--new-tokens must be >= 3, got {args.new_tokens}.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = build_model(torch.device(args.device))
    parameters = sum(p.numel() for p in model.parameters())
    document = torch.randint(3, VOCAB, (args.n,), generator=torch.Generator().manual_seed(1))
    prefixes = {
        "cartridge": from_token_ids(model, document[: args.p].tolist()),
        "icl": from_token_ids(model, document.tolist()),
    }
    bytes_per_token = kv_layout(model).bytes_per_token(model.dtype)
    logger.info(
        "Serving benchmark on %s: random Llama, %.1fM parameters, %d layers, n=%d, p=%d "
        "(n/p=%.0f), %d question + %d decoded tokens per request",
        args.device,
        parameters / 1e6,
        model.config.num_hidden_layers,
        args.n,
        args.p,
        args.n / args.p,
        QUESTION_TOKENS,
        args.new_tokens,
    )
    results = equal_concurrency(model, prefixes, args, bytes_per_token)
    runs = within_budget(model, prefixes, args, bytes_per_token)
    print(json.dumps(summarise(args, parameters, results, runs, bytes_per_token)))  # noqa: T201


def summarise(args, parameters: int, results: dict, runs: dict[str, BudgetRun], bpt: int) -> dict:
    """Log the ratios and return the headline figures."""
    kv_ratio = results[("icl", 1)][1] / results[("cartridge", 1)][1]
    speedups = {c: results[("cartridge", c)][0] / results[("icl", c)][0] for c in (1, 16)}
    logger.info("KV memory per request, ICL / cartridge: %.2fx", kv_ratio)
    for concurrency, speedup in speedups.items():
        logger.info(
            "Decode speed-up at concurrency %d, cartridge / ICL: %.2fx", concurrency, speedup
        )
    ratio = runs["cartridge"].tokens_per_s / runs["icl"].tokens_per_s
    logger.info(
        "Peak decode throughput within %.2f MiB of KV, cartridge (c=%d) / ICL (c=%d): %.2fx",
        args.kv_budget_mb,
        runs["cartridge"].concurrency,
        runs["icl"].concurrency,
        ratio,
    )
    own = (QUESTION_TOKENS + args.new_tokens) * bpt
    shared = {
        name: (runs[name].prefix_bytes / runs[name].concurrency + own) / 2**20 for name in runs
    }
    return {
        "benchmark": "serving",
        "device": args.device,
        "model_parameters_m": round(parameters / 1e6, 2),
        "n": args.n,
        "p": args.p,
        "kv_memory_ratio": round(kv_ratio, 2),
        "kv_mib_per_request_cartridge": round(results[("cartridge", 1)][1] / 2**20, 3),
        "kv_mib_per_request_icl": round(results[("icl", 1)][1] / 2**20, 3),
        "decode_tok_s_c1_cartridge": round(results[("cartridge", 1)][0], 1),
        "decode_tok_s_c1_icl": round(results[("icl", 1)][0], 1),
        "decode_tok_s_c16_cartridge": round(results[("cartridge", 16)][0], 1),
        "decode_tok_s_c16_icl": round(results[("icl", 16)][0], 1),
        "decode_speedup_c1": round(speedups[1], 2),
        "decode_speedup_c16": round(speedups[16], 2),
        "kv_budget_mib": args.kv_budget_mb,
        "budget_concurrency_cartridge": runs["cartridge"].concurrency,
        "budget_concurrency_icl": runs["icl"].concurrency,
        "budget_decode_tok_s_cartridge": round(runs["cartridge"].tokens_per_s, 1),
        "budget_decode_tok_s_icl": round(runs["icl"].tokens_per_s, 1),
        "budget_throughput_ratio": round(ratio, 2),
        "kv_mib_per_request_shared_cartridge": round(shared["cartridge"], 3),
        "kv_mib_per_request_shared_icl": round(shared["icl"], 3),
    }


if __name__ == "__main__":
    main()
