"""Peak memory and throughput of training on targets read from disk versus held in memory.

Synthetic self-study output of realistic shape (prompts of 16-64 tokens, answers of 32-384
tokens, top-20 teacher entries per answer token) is written as the pipeline writes it: one
conversations shard and one targets shard per batch of conversations. Then a fixed number of
optimiser steps runs in a fresh process for each case, so each peak RSS is that run's alone:

- ``lazy``: the catalog's path, ``ShardedTable`` handles -> ``LazyExamples`` (an index in
  memory, each micro-batch read from disk ahead of time by a background thread);
- ``memory``: the previous path, whole DataFrames -> dense tensors for every conversation.

Printed: the lazy path's peak-RSS ratio between the largest and the smallest dataset (flat
means memory does not grow with the number of conversations) and its tokens/s relative to the
in-memory path on the same data, median of ``--repeats`` runs. The last line is one JSON object.

Usage: ``python benchmarks/distill_training_memory.py [--sizes 4096 32768] [--steps 12]``; on a
GPU, e.g. ``--device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger("benchmark")
TOP_K = 20
PER_SHARD = 512  # conversations per shard, as self-study writes one shard per batch


def write_data(directory: Path, count: int, vocab: int, seed: int = 0) -> None:
    """``count`` conversations and their flat top-k targets as parquet shards in ``directory``."""
    rng = np.random.default_rng(seed)
    (directory / "conversations").mkdir(parents=True)
    (directory / "targets").mkdir()
    for shard, first in enumerate(range(0, count, PER_SHARD)):
        ids = [f"conv-{i:07d}" for i in range(first, min(first + PER_SHARD, count))]
        prompts = rng.integers(16, 65, len(ids))
        answers = rng.integers(32, 385, len(ids))
        lengths = prompts + answers
        tokens = [rng.integers(0, vocab, n, dtype=np.int32) for n in lengths]
        conversations = pa.table(
            {
                "conversation_id": ids,
                "messages": ["[]"] * len(ids),
                "token_ids": pa.array(tokens, pa.list_(pa.int32())),
                "answer_start": pa.array(prompts, pa.int32()),
                "num_tokens": pa.array(lengths, pa.int32()),
            }
        )
        positions = np.concatenate(
            [
                np.repeat(np.arange(p, n, dtype=np.int32), TOP_K)
                for p, n in zip(prompts, lengths, strict=True)
            ]
        )
        rows = len(positions)
        owner = np.repeat(np.arange(len(ids), dtype=np.int32), answers * TOP_K)
        logprobs = -np.sort(rng.exponential(2.0, (rows // TOP_K, TOP_K)), axis=1).ravel()
        targets = pa.table(
            {
                "conversation_id": pa.DictionaryArray.from_arrays(owner, pa.array(ids)),
                "position": positions,
                "token_id": rng.integers(0, vocab, rows, dtype=np.int32),
                "logprob": logprobs.astype(np.float32),
            }
        )
        pq.write_table(conversations, directory / "conversations" / f"c-{shard:05d}.parquet")
        pq.write_table(
            targets, directory / "targets" / f"t-{shard:05d}.parquet", row_group_size=65_536
        )


def worker(args: argparse.Namespace) -> None:
    """One measured run: load the data one way, train ``--steps`` steps, print figures."""
    import torch
    from models import build_model

    from cartridges.initialization import from_token_ids
    from cartridges.storage import open_store
    from cartridges.tables import ShardedTable
    from cartridges.target_store import to_examples
    from cartridges.training import TrainConfig, train_cartridge

    if args.threads:
        torch.set_num_threads(args.threads)
    store, root = open_store(args.data)  # a folder, or a URL on an object store

    def table(kind: str) -> ShardedTable:
        return ShardedTable(sorted(store.fs.glob(f"{root}/{kind}/*.parquet")), store=store)

    conversations, targets = table("conversations"), table("targets")
    model = build_model(args.vocab, args.hidden, args.layers).to(args.device)
    model = model.to(getattr(torch, args.dtype))
    started = time.perf_counter()
    if args.mode == "lazy":
        examples = to_examples(conversations, targets, args.vocab)
    else:
        examples = to_examples(conversations.to_pandas(), targets.to_pandas(), args.vocab)
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
        mixed_precision="bfloat16" if args.dtype == "bfloat16" else "none",
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


def run_worker(
    args: argparse.Namespace, data: str | Path, mode: str, env: dict[str, str] | None = None
) -> dict[str, float]:
    """One measured run in a fresh process (its peak RSS is its own)."""
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--data", str(data)]
    for name in ("steps", "warmup", "micro_batch", "global_batch", "p", "vocab", "hidden"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--layers", str(args.layers), "--device", args.device, "--dtype", args.dtype]
    command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"{mode} run on {data} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def medians(results: dict[tuple[str, int], list[dict[str, float]]]) -> dict:
    """Per case, the median of each figure over its runs."""
    return {
        key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        for key, runs in results.items()
    }


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of one measured training run (shared with benchmarks/object_storage.py)."""
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["lazy", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768])
    add_run_arguments(parser)
    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="*",
        default=None,
        help="sizes that also run the in-memory path (default: the smallest; it needs GBs)",
    )
    parser.add_argument("--workdir", default=None, help="where to write the data (default: tmp)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    memory_sizes = args.memory_sizes if args.memory_sizes is not None else [min(args.sizes)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for size in args.sizes:
            data = Path(workdir) / f"n{size}"
            started = time.perf_counter()
            write_data(data, size, args.vocab)
            rows = sum(pq.read_metadata(f).num_rows for f in (data / "targets").iterdir())
            logger.info(
                "%d conversations, %d target rows written in %.0f s",
                size,
                rows,
                time.perf_counter() - started,
            )
            modes = ["lazy", "memory"] if size in memory_sizes else ["lazy"]
            for repeat in range(args.repeats):
                for mode in modes:  # interleaved, so drift in the machine hits both alike
                    figures = run_worker(args, data, mode)
                    results.setdefault((mode, size), []).append(figures)
                    logger.info("  %s run %d: %s", mode, repeat + 1, figures)
    median = medians(results)
    for (mode, size), figures in sorted(median.items()):
        logger.info(
            "%-6s %6d conversations: peak RSS %7.0f MB, %7.0f tokens/s, prepare %.1f s",
            mode,
            size,
            figures["peak_rss_mb"],
            figures["tokens_per_s"],
            figures["prepare_s"],
        )
    small, large = min(args.sizes), max(args.sizes)
    rss_ratio = median["lazy", large]["peak_rss_mb"] / median["lazy", small]["peak_rss_mb"]
    speed = {
        size: median["lazy", size]["tokens_per_s"] / median["memory", size]["tokens_per_s"]
        for size in memory_sizes
    }
    logger.info("lazy peak RSS, %d vs %d conversations: x%.3f", large, small, rss_ratio)
    for size, ratio in speed.items():
        logger.info("lazy / in-memory tokens/s at %d conversations: x%.3f", size, ratio)
    summary = {
        "lazy_peak_rss_ratio": rss_ratio,
        "lazy_vs_memory_tokens_per_s": {str(k): v for k, v in speed.items()},
        "median": {f"{mode}_{size}": figures for (mode, size), figures in median.items()},
        "device": args.device,
        "repeats": args.repeats,
    }
    print(json.dumps(summary))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
