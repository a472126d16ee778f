"""Serving a cartridge versus the document in context, and the server's two schedulers, in one run.

Two cases for measures 1 and 2:

- ``cartridge``: a cartridge of ``p`` tokens as prefix;
- ``icl``: the ``n``-token document's KV as prefix (prefilled once, as a prefix-caching server
  would; prefill time is excluded from both cases).

Three measures:

1. Equal concurrency, with ``generate`` (one call per batch of concurrent requests, the prefix
   a broadcast view): decode tokens/s = rows x (N - 1) / (time(N new tokens) - time(1 new
   token)), best of a few repeats, at concurrency 1 and 16. KV memory per request is what each
   row's cache holds at the end, ``(prefix + question + N) x bytes per token``: ``generate``
   copies the shared prefix into each row's cache on its first decode step.
2. The paper's measure, peak decode throughput within a fixed KV memory budget
   (``--kv-budget-mb``), with :class:`~cartridges.decoding.continuous.ContinuousBatcher`, which
   stores each prefix once and reserves ``question + N`` tokens per request: each case runs at the
   largest concurrency the budget admits (the batcher's own admission decides). The default
   budget holds the document plus three ICL requests. Tokens/s = rows x (N - 1) / time of the
   N - 1 decode steps after the prefill. KV bytes per request are printed both ways: with the
   prefix shared (``prefix / rows + question + N``) and with a copy per row.
3. Mixed load over HTTP: a real server on 127.0.0.1 (uvicorn on a thread) serving 4 cartridges
   of ``p`` tokens, once with ``scheduler: continuous`` and once with ``static``, each sent the
   same open-loop schedule: ``--requests`` completions (fixed seed) arriving at a steady rate,
   each naming a random one of the cartridges, with a prompt of 8-32 tokens and, three in four,
   a short answer (8-32 tokens), else a long one (96-160): the mix that makes a static batch
   wait for its longest row. Throughput = completion tokens / (first arrival .. last answer);
   latency = scheduled arrival .. whole answer. The rate is ``--load`` requests per *solo
   time*, the decode time of one mean-length request alone (measured first), so that it scales
   with the device. ``--load 5`` was chosen on a 2-core CPU as a rate that saturates the static
   scheduler (it decodes one cartridge group at a time, each to its longest row, and takes
   newcomers only then: its queue grows all through the run and its median latency is tens of
   solo times) while the continuous one keeps up (median latency a few solo times). ``--rate``
   sets requests/s directly.

The model is a random 8-layer Llama of about 6M parameters built from a config (nothing is
downloaded). On the CPU it runs on ``--threads`` threads (default 1: on a shared machine more
threads mostly wait on each other). The last line printed is one JSON object with the headline
figures.

Usage: ``python benchmarks/serving.py [--n 2048] [--p 128] [--new-tokens 32] [--kv-budget-mb 8.6]
[--requests 128] [--load 5 | --rate R] [--device cuda]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from openai import AsyncOpenAI
from transformers import LlamaConfig, LlamaForCausalLM

from cartridges.checkpoint import save_cartridge
from cartridges.decoding.continuous import ContinuousBatcher, Request
from cartridges.generation import generate
from cartridges.initialization import from_token_ids
from cartridges.modeling import kv_layout
from cartridges.serving import BackgroundServer, ServingConfig, create_app
from cartridges_testing.tiny_model import build_tokenizer

logger = logging.getLogger("benchmark")
VOCAB = 2048
QUESTION_TOKENS = 16
MIXED_CARTRIDGES = 4
SHORT, LONG, LONG_SHARE = (8, 32), (96, 160), 0.25  # answer lengths of the mixed load


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


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _time(model, prompts, prefix, new_tokens: int) -> float:
    _sync(model)
    started = time.perf_counter()
    generate(model, prompts, prefix=prefix, max_new_tokens=new_tokens, stop_token_ids=())
    _sync(model)
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


# --------------------------------------------------------------------------- 3. mixed load
@dataclass
class LoadRun:
    """One scheduler under the open-loop mixed load."""

    tokens_per_s: float  # completion tokens / (first arrival .. last answer)
    p50_s: float  # latencies: scheduled arrival .. whole answer
    p99_s: float
    seconds: float
    max_rows: int  # most rows in one step or generate call (the server's stats)


def _max_tokens(rng: random.Random) -> int:
    low, high = LONG if rng.random() < LONG_SHARE else SHORT
    return rng.randint(low, high)


def load_schedule(requests: int, rate: float, seed: int = 3) -> list[tuple[float, dict]]:
    """``(arrival offset in s, completion request)`` per request, every ``1 / rate`` seconds."""
    rng = random.Random(seed)
    schedule = []
    for index in range(requests):
        cartridge = [{"id": f"c{rng.randrange(MIXED_CARTRIDGES)}", "source": "local"}]
        body = {
            "prompt": [rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 32))],
            "max_tokens": _max_tokens(rng),
            "extra_body": {"cartridges": cartridge},
        }
        schedule.append((index / rate, body))
    return schedule


def solo_seconds(model, cartridge) -> float:
    """Decode time of one request of mean length alone (the rate's unit), best of two."""
    mean = round((1 - LONG_SHARE) * sum(SHORT) / 2 + LONG_SHARE * sum(LONG) / 2)
    prompt = [[5] * 20]
    _time(model, prompt, cartridge, 2)  # warm-up
    return min(_time(model, prompt, cartridge, mean) for _ in range(2))


async def _send(client: AsyncOpenAI, at: float, body: dict, start: float) -> tuple[float, int]:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))  # open loop: on schedule
    answer = await client.completions.create(model="benchmark", temperature=0, **body)
    return time.perf_counter() - (start + at), answer.usage.completion_tokens


async def _drive(base_url: str, schedule: list[tuple[float, dict]]) -> tuple[list, float]:
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=900)
    for index in range(MIXED_CARTRIDGES):  # load each cartridge once, untimed
        body = {**schedule[0][1], "max_tokens": 2}
        body["extra_body"] = {"cartridges": [{"id": f"c{index}", "source": "local"}]}
        await _send(client, 0.0, body, time.perf_counter())
    start = time.perf_counter()
    results = await asyncio.gather(*(_send(client, at, b, start) for at, b in schedule))
    return results, time.perf_counter() - start


def serve_load(model, tokenizer, root: Path, scheduler: str, schedule) -> LoadRun:
    """The schedule sent to a real server on 127.0.0.1 that uses ``scheduler``."""
    config = ServingConfig(
        model_name_or_path="benchmark",
        device=str(model.device),
        cartridge_dir=str(root),
        scheduler=scheduler,
        max_tokens=max(body["max_tokens"] for _, body in schedule),
    )
    with BackgroundServer(create_app(config, model, tokenizer)) as server:
        results, seconds = asyncio.run(_drive(server.base_url, schedule))
        max_rows = server.server.config.app.state.service.engine.stats.max_batch_rows
    latencies = [latency for latency, _ in results]
    tokens = sum(count for _, count in results)
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    return LoadRun(tokens / seconds, statistics.median(latencies), p99, seconds, max_rows)


def mixed_load(model, args) -> tuple[float, dict[str, LoadRun]]:
    """Measure 3: the arrival rate, and each scheduler under the same open-loop mixed load."""
    tokenizer = build_tokenizer([], vocab_size=512)  # decodes the answers; prompts are ids
    generator = torch.Generator().manual_seed(4)
    cartridges = [
        from_token_ids(model, torch.randint(3, VOCAB, (args.p,), generator=generator).tolist())
        for _ in range(MIXED_CARTRIDGES)
    ]
    rate = args.rate or args.load / solo_seconds(model, cartridges[0])
    schedule = load_schedule(args.requests, rate)
    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for index, cartridge in enumerate(cartridges):
            save_cartridge(cartridge, Path(root) / f"c{index}.safetensors")
        for scheduler in ("continuous", "static"):
            run = runs[scheduler] = serve_load(model, tokenizer, Path(root), scheduler, schedule)
            logger.info(
                "%10s  %d requests at %.1f/s: %7.1f tok/s   latency p50 %.2fs p99 %.2fs   "
                "(%.1fs, at most %d rows in a step or generate call)",
                *(scheduler, len(schedule), rate, run.tokens_per_s, run.p50_s, run.p99_s),
                *(run.seconds, run.max_rows),
            )
    return rate, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="document tokens (ICL context)")
    parser.add_argument("--p", type=int, default=128, help="cartridge tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per request")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--kv-budget-mb", type=float, default=8.6, help="KV budget (MiB)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--requests", type=int, default=128, help="mixed load: requests")
    parser.add_argument("--load", type=float, default=5.0, help="arrivals per solo decode")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (overrides --load)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.n < 16 * args.p:
        parser.error(f"n/p must be >= 16; got n={args.n}, p={args.p}.")
    if args.new_tokens < 3:
        parser.error(f"--new-tokens must be >= 3, got {args.new_tokens}.")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # the server's and the HTTP client's logs stay quiet
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
        *(args.device, parameters / 1e6, model.config.num_hidden_layers, args.n, args.p),
        *(args.n / args.p, QUESTION_TOKENS, args.new_tokens),
    )
    results = equal_concurrency(model, prefixes, args, bytes_per_token)
    runs = within_budget(model, prefixes, args, bytes_per_token)
    rate, load = mixed_load(model, args)
    figures = summarise(args, parameters, results, runs, bytes_per_token)
    print(json.dumps({**figures, **summarise_load(rate, load)}))  # noqa: T201


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


def summarise_load(rate: float, runs: dict[str, LoadRun]) -> dict:
    """Log the continuous / static ratios and return the mixed load's headline figures."""
    continuous, static = runs["continuous"], runs["static"]
    throughput = continuous.tokens_per_s / static.tokens_per_s
    p99 = static.p99_s / continuous.p99_s
    logger.info(
        "Mixed load, continuous / static: throughput %.2fx, p99 %.2fx lower", throughput, p99
    )
    figures = {"mixed_rate_rps": round(rate, 2)}
    for name, run in runs.items():
        figures[f"mixed_tok_s_{name}"] = round(run.tokens_per_s, 1)
        figures[f"mixed_p50_s_{name}"] = round(run.p50_s, 2)
        figures[f"mixed_p99_s_{name}"] = round(run.p99_s, 2)
    return {
        **figures,
        "mixed_throughput_ratio": round(throughput, 2),
        "mixed_p99_ratio": round(p99, 2),
    }


if __name__ == "__main__":
    main()
