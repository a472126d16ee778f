"""Benchmark the cost of page checksums on the teacher targets training reads.

Writes ``--rows`` rows of teacher targets shaped as self-study writes them (conversation id,
position, token id, log-probability; 64k-row row groups, 1M-row shards) once with page checksums,
and the conversations they belong to. Then, alternating, ``--repeats`` times:

- a training epoch's reads, as training makes them: every conversation once, in shuffled
  micro-batches of ``--batch`` conversations, through ``LazyExamples.read`` (row groups decoded,
  targets made dense). Three arms: no verification; every page verified each time it is read
  (as handles read before they remembered what they verified); each page verified the first
  time the handle reads it (as training reads; a fresh handle per epoch, so every page is
  verified within the epoch measured);
- every row group read once, sequentially, with verification and without;
- the full ``verify()`` pass a resumed self-study makes over its shards.

Prints the ratios; the last line is one JSON object with the headline figures.

    python benchmarks/checksums.py [--rows 100000000] [--repeats 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import cartridges.tables as tables  # noqa: E402
from cartridges.tables import ShardedTable, write_parquet  # noqa: E402
from cartridges.target_store import LazyExamples  # noqa: E402

ROWS_PER_SHARD = 1_000_000
ROW_GROUP = 65_536
TOP_K = 20  # targets per position
POSITIONS = 500  # per conversation


def write_targets(folder: Path, rows: int) -> list[Path]:
    """Targets of ``rows // (TOP_K * POSITIONS)`` conversations in 1M-row shards."""
    rng = np.random.default_rng(0)
    files = []
    for index, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        count = min(ROWS_PER_SHARD, rows - start)
        global_rows = np.arange(start, start + count)
        conversation = global_rows // (TOP_K * POSITIONS)
        table = pa.table(
            {
                "conversation_id": pa.array([f"conv-{c:08d}" for c in np.unique(conversation)])
                .take(pa.array(conversation - conversation[0]))
                .dictionary_encode(),
                "position": pa.array((global_rows // TOP_K % POSITIONS + 1).astype(np.int32)),
                "token_id": pa.array(rng.integers(0, 49_152, count, dtype=np.int32)),
                "logprob": pa.array(-rng.exponential(3.0, count).astype(np.float32)),
            }
        )
        files.append(folder / f"targets-{index:06d}.parquet")
        write_parquet(table, files[-1], row_group_size=ROW_GROUP)
    return files


def write_conversations(folder: Path, rows: int) -> Path:
    """The conversations the targets belong to: ``POSITIONS + 1`` token ids each."""
    count = -(-rows // (TOP_K * POSITIONS))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 49_152, (count, POSITIONS + 1), dtype=np.int32)
    path = folder / "conversations.parquet"
    table = pa.table(
        {
            "conversation_id": [f"conv-{c:08d}" for c in range(count)],
            "token_ids": pa.FixedSizeListArray.from_arrays(tokens.ravel(), POSITIONS + 1).cast(
                pa.list_(pa.int32())
            ),
            "num_tokens": pa.array(np.full(count, POSITIONS + 1, dtype=np.int32)),
        }
    )
    write_parquet(table, path, row_group_size=256)  # as the catalog writes conversations
    return path


def training_epoch(
    conversations: Path, targets: list[Path], batch: int, arm: str, seed: int
) -> float:
    """Seconds to read every conversation's examples once, in shuffled micro-batches."""
    examples = LazyExamples.open(ShardedTable([conversations]), ShardedTable(targets), 49_152)
    order = np.random.default_rng(seed).permutation(len(examples))
    handle = examples._targets  # remembers which pages it verified
    plain = tables.parquet_file
    if arm == "none":
        tables.parquet_file = lambda path, **options: pq.ParquetFile(
            path, page_checksum_verification=False, **options
        )
    try:
        started = time.perf_counter()
        for first in range(0, len(order), batch):
            if arm == "every read":
                handle._verified.clear()
            examples.read(order[first : first + batch])
        return time.perf_counter() - started
    finally:
        tables.parquet_file = plain


def read_epoch(files: list[Path], verify: bool) -> float:
    """Seconds to read every row group of every file, one group at a time."""
    started = time.perf_counter()
    for path in files:
        parquet = pq.ParquetFile(path, page_checksum_verification=verify)
        for group in range(parquet.metadata.num_row_groups):
            parquet.read_row_group(group)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="conversations per micro-batch")
    parser.add_argument("--dir", default=None, help="where to write the shards (a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        started = time.perf_counter()
        files = write_targets(Path(folder), args.rows)
        conversations = write_conversations(Path(folder), args.rows)
        written = time.perf_counter() - started
        size = sum(os.path.getsize(f) for f in files)
        print(f"wrote {args.rows:,} rows, {size / 1e9:.2f} GB, {written:.0f} s")  # noqa: T201
        read_epoch(files, verify=False)  # page cache warm for every arm
        arms = ("none", "every read", "once")
        epochs: dict[str, list[float]] = {arm: [] for arm in arms}
        plain, checked, full = [], [], []
        for repeat in range(args.repeats):
            for arm in arms:
                epochs[arm].append(training_epoch(conversations, files, args.batch, arm, repeat))
            plain.append(read_epoch(files, verify=False))
            checked.append(read_epoch(files, verify=True))
            started = time.perf_counter()
            ShardedTable(files).verify()
            full.append(time.perf_counter() - started)
            base, every, once = (epochs[arm][-1] for arm in arms)
            print(  # noqa: T201 - one line per paired run
                f"run {repeat + 1}: a training epoch's reads {base:.2f} s without checksums, "
                f"{every:.2f} s verifying every read ({every / base - 1:+.1%}), {once:.2f} s "
                f"verifying each page once ({once / base - 1:+.1%}); sequential read of every "
                f"row group {plain[-1]:.2f} s, verified {checked[-1]:.2f} s "
                f"({checked[-1] / plain[-1] - 1:+.1%}); resume verify {full[-1]:.2f} s",
                flush=True,
            )

    def overhead(arm: str) -> float:
        ratios = [a / b - 1 for a, b in zip(epochs[arm], epochs["none"], strict=True)]
        return round(statistics.median(ratios), 4)

    figures = {
        "rows": args.rows,
        "bytes": size,
        "batch": args.batch,
        "training_epoch_read_s": round(statistics.median(epochs["none"]), 2),
        "verification_overhead": overhead("once"),
        "every_read_verification_overhead": overhead("every read"),
        "sequential_read_s": round(statistics.median(plain), 2),
        "sequential_read_verified_overhead": round(
            statistics.median(c / p - 1 for c, p in zip(checked, plain, strict=True)), 4
        ),
        "resume_verify_s": round(statistics.median(full), 2),
    }
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
