"""ShardedTable: lazy reads that match pandas, and clear errors for missing or broken shards."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cartridges.tables import ShardedTable, ShardError


@pytest.fixture()
def table(tmp_path) -> ShardedTable:
    """25 rows in three files with row groups of 4, 3 and 5 rows."""
    files = []
    for index, (start, stop, group) in enumerate(((0, 10, 4), (10, 17, 3), (17, 25, 5))):
        path = tmp_path / f"anything-{index}.parquet"
        frame = pd.DataFrame(
            {"x": np.arange(start, stop), "y": [f"r{i}" for i in range(start, stop)]}
        )
        pq.write_table(
            pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=group
        )
        files.append(path)
    return ShardedTable(files)


def test_metadata_comes_from_footers_and_whole_reads_match(table):
    assert table.num_rows == 25 and table.file_num_rows == [10, 7, 8]
    assert table.schema.names == ["x", "y"]
    assert table.to_pandas()["x"].tolist() == list(range(25))
    assert table.to_pandas(columns=["y"]).columns.tolist() == ["y"]
    batches = list(table.iter_batches(["x"], batch_size=3))
    assert max(len(b) for b in batches) <= 3
    assert np.concatenate([b.column(0).to_numpy() for b in batches]).tolist() == list(range(25))


@pytest.mark.parametrize(
    "ranges", [[(0, 25)], [(3, 14), (0, 1)], [(9, 11), (16, 18), (5, 5)], [(24, 25), (0, 0)]]
)
def test_row_ranges_span_row_groups_and_files(table, ranges):
    read = table.take_ranges(ranges, ["x"])
    assert [t.column("x").to_pylist() for t in read] == [list(range(a, b)) for a, b in ranges]
    assert table.read_rows(1, 2, 6, ["y"]).column("y").to_pylist() == ["r12", "r13", "r14", "r15"]


def test_ranges_outside_the_table_are_refused(table):
    with pytest.raises(ShardError, match=r"Rows \[20, 26\) are outside the 25 rows"):
        table.take_ranges([(20, 26)])


def test_filter_rows_keeps_table_order(table):
    assert table.filter_rows("y", ["r20", "r3"])["x"].tolist() == [3, 20]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ShardError, match=r"not found: \['.*gone.parquet'\]"):
        ShardedTable([tmp_path / "gone.parquet"])
    with pytest.raises(TypeError, match="sequence of files, not a single path"):
        ShardedTable(str(tmp_path / "a.parquet"))


def test_shard_deleted_after_listing_is_named(table):
    table.files[1].unlink()
    with pytest.raises(ShardError, match=r"anything-1.parquet' disappeared"):
        table.take_ranges([(11, 12)])
    with pytest.raises(ShardError, match=r"anything-1.parquet' disappeared"):
        list(table.iter_batches())


def test_truncated_shard_is_named(table):
    path = table.files[2]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ShardError, match=r"anything-2.parquet' is not a readable parquet file"):
        table.num_rows  # noqa: B018 - reading the footer is the point
    with pytest.raises(ShardError, match=r"anything-2.parquet' is not a readable parquet file"):
        table.take_ranges([(20, 21)])


def test_schema_mismatch_names_the_file(tmp_path, table):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": ["a"], "y": ["b"]}), other)
    with pytest.raises(ShardError, match=r"Shard '.*other.parquet' has schema"):
        ShardedTable([*table.files, other]).schema  # noqa: B018


def test_fingerprint_follows_the_content(tmp_path, table):
    before = table.fingerprint()
    assert ShardedTable(table.files).fingerprint() == before
    pq.write_table(
        pa.table({"x": np.arange(10, 17), "y": [f"s{i}" for i in range(7)]}), table.files[1]
    )
    assert ShardedTable(table.files).fingerprint() != before


def test_a_table_copies_and_pickles_with_what_it_has_verified_left_behind(table):
    """A handle with a lock inside could not be deep-copied (Kedro copies memory datasets)."""
    table.take_ranges([(0, 25)])
    for other in (copy.deepcopy(table), pickle.loads(pickle.dumps(table))):
        assert other.files == table.files and other._verified == {}
        assert other.take_ranges([(3, 14)], ["x"])[0].column("x").to_pylist() == list(range(3, 14))
