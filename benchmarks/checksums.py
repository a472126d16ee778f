"""Benchmark the cost of page checksums on the teacher targets training reads.

Writes ``--rows`` rows of teacher targets shaped as self-study writes them (conversation id,
position, token id, log-probability; 64k-row row groups, 1M-row shards) once with page checksums,
then reads every row group the way training does (one row group at a time, all columns), with
checksum verification and without, alternating, ``--repeats`` times. Also times the full
``verify()`` pass a resumed self-study makes over its shards. Prints the ratios; the last line is
one JSON object with the headline figures.

    python benchmarks/checksums.py [--rows 100000000] [--repeats 3]
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

from cartridges.tables import ShardedTable, write_parquet  # noqa: E402

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
                "position": pa.array((global_rows // TOP_K % POSITIONS).astype(np.int32)),
                "token_id": pa.array(rng.integers(0, 49_152, count, dtype=np.int32)),
                "logprob": pa.array(-rng.exponential(3.0, count).astype(np.float32)),
            }
        )
        files.append(folder / f"targets-{index:06d}.parquet")
        write_parquet(table, files[-1], row_group_size=ROW_GROUP)
    return files


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
    parser.add_argument("--dir", default=None, help="where to write the shards (a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        started = time.perf_counter()
        files = write_targets(Path(folder), args.rows)
        written = time.perf_counter() - started
        size = sum(os.path.getsize(f) for f in files)
        gigabytes = size / 1e9
        print(f"wrote {args.rows:,} rows, {gigabytes:.2f} GB, {written:.0f} s")  # noqa: T201
        read_epoch(files, verify=False)  # page cache warm for both arms
        plain, checked, full = [], [], []
        for repeat in range(args.repeats):
            plain.append(read_epoch(files, verify=False))
            checked.append(read_epoch(files, verify=True))
            started = time.perf_counter()
            ShardedTable(files).verify()
            full.append(time.perf_counter() - started)
            print(  # noqa: T201 - one line per paired run
                f"run {repeat + 1}: epoch read {plain[-1]:.2f} s without checksums, "
                f"{checked[-1]:.2f} s with ({checked[-1] / plain[-1] - 1:+.1%}); "
                f"resume verify {full[-1]:.2f} s",
                flush=True,
            )
    overhead = statistics.median(c / p - 1 for c, p in zip(checked, plain, strict=True))
    figures = {
        "rows": args.rows,
        "bytes": size,
        "epoch_read_s": round(statistics.median(plain), 2),
        "epoch_read_verified_s": round(statistics.median(checked), 2),
        "verification_overhead": round(overhead, 4),
        "resume_verify_s": round(statistics.median(full), 2),
    }
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
