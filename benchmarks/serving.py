"""Serving a cartridge versus the same model with the document in context, measured in one run.

Both cases decode with the server's own path (one ``generate`` call per batch of concurrent
requests, the KV prefix shared by the rows as a broadcast view):

- ``cartridge``: a cartridge of ``p`` tokens as prefix;
- ``icl``: the ``n``-token document's KV as prefix (prefilled once, as a prefix-caching server
  would; prefill time is excluded from both cases).

Decode tokens/s = rows x (N - 1) / (time(N new tokens) - time(1 new token)), best of a few
repeats, at concurrency 1 and 16. KV memory per request is what each row's cache holds at the
end of decoding, ``(prefix + question + N) x bytes per token``: ``generate`` copies the shared
prefix into each row's cache on its first decode step. The model is a random 8-layer Llama of
about 6M parameters built from a config (nothing is downloaded). The last line printed is one
JSON object with the headline figures.

Usage: ``python benchmarks/serving.py [--n 2048] [--p 128] [--new-tokens 32]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="document tokens (ICL context)")
    parser.add_argument("--p", type=int, default=128, help="cartridge tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per request")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.n < 16 * args.p:
        parser.error(f"n/p must be >= 16; got n={args.n}, p={args.p}.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = build_model(torch.device(args.device))
    parameters = sum(p.numel() for p in model.parameters())
    document = torch.randint(3, VOCAB, (args.n,), generator=torch.Generator().manual_seed(1))
    prefixes = {
        "cartridge": from_token_ids(model, document[: args.p].tolist()),
        "icl": from_token_ids(model, document.tolist()),
    }
    bytes_per_token = kv_layout(model).bytes_per_token(model.dtype)
    rows, results = [], {}
    for name, prefix in prefixes.items():
        kv_per_request = (prefix.num_tokens + QUESTION_TOKENS + args.new_tokens) * bytes_per_token
        for concurrency in (1, 16):
            rate = decode_tokens_per_s(model, prefix, concurrency, args.new_tokens, args.repeats)
            results[(name, concurrency)] = (rate, kv_per_request)
            rows.append(
                f"{name:>9}  prefix {prefix.num_tokens:>5}  c={concurrency:<3} "
                f"decode {rate:>9.1f} tok/s   KV/request {kv_per_request / 2**20:>7.2f} MiB   "
                f"KV for all {concurrency * kv_per_request / 2**20:>8.2f} MiB"
            )
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
    for row in rows:
        logger.info(row)
    kv_ratio = results[("icl", 1)][1] / results[("cartridge", 1)][1]
    speedups = {c: results[("cartridge", c)][0] / results[("icl", c)][0] for c in (1, 16)}
    logger.info("KV memory per request, ICL / cartridge: %.2fx", kv_ratio)
    for concurrency, speedup in speedups.items():
        logger.info(
            "Decode speed-up at concurrency %d, cartridge / ICL: %.2fx", concurrency, speedup
        )
    summary = {
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
    }
    print(json.dumps(summary))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
