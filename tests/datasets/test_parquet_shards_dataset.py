"""ParquetShardsDataset: lazy loads, streamed saves of handles, refusal of damaged versions."""

from __future__ import annotations

import json
import os
import stat
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kedro.io import DatasetError, Version

from cartridges.datasets import ParquetShardsDataset
from cartridges.tables import ShardedTable, ShardError

# Kedro wraps a dataset's errors in DatasetError, keeping the message.
FRAME = pd.DataFrame({"conversation_id": [f"c{i // 3}" for i in range(10)], "x": np.arange(10)})


def _dataset(tmp_path, **kwargs) -> ParquetShardsDataset:
    return ParquetShardsDataset(str(tmp_path / "table"), version=Version(None, None), **kwargs)


def test_dataframe_round_trip_through_a_lazy_handle(tmp_path):
    dataset = _dataset(tmp_path, rows_per_shard=4, row_group_size=3)
    dataset.save(FRAME)
    table = ParquetShardsDataset(str(tmp_path / "table"), version=Version(None, None)).load()
    assert isinstance(table, ShardedTable)
    assert [p.name for p in table.files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert table.num_rows == 10 and table.file_num_rows == [4, 4, 2]
    assert max(table.metadata(0).row_group(g).num_rows for g in range(2)) == 3
    pd.testing.assert_frame_equal(table.to_pandas(), FRAME)


def test_handle_with_any_file_names_is_linked_not_read(tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    files = []
    for index, start in enumerate((0, 6)):
        files.append(source / f"targets-{index:06d}.parquet")
        pq.write_table(pa.Table.from_pandas(FRAME.iloc[start : start + 6]), files[-1])
    dataset = _dataset(tmp_path)
    dataset.save(ShardedTable(files))
    loaded = dataset.load()
    assert [p.stat().st_ino for p in loaded.files] == [p.stat().st_ino for p in files]
    pd.testing.assert_frame_equal(loaded.to_pandas(), FRAME)


def test_handle_with_large_row_groups_is_rewritten_in_bounded_groups(tmp_path):
    path = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pandas(FRAME), path)  # a single row group of 10 rows
    dataset = _dataset(tmp_path, row_group_size=4)
    dataset.save(ShardedTable([path]))
    loaded = dataset.load()
    footer = loaded.metadata(0)
    assert [footer.row_group(g).num_rows for g in range(footer.num_row_groups)] == [4, 4, 2]
    assert loaded.files[0].stat().st_ino != path.stat().st_ino
    pd.testing.assert_frame_equal(loaded.to_pandas(), FRAME)


def test_deleted_shard_is_refused_by_name(tmp_path):
    dataset = _dataset(tmp_path, rows_per_shard=4)
    dataset.save(FRAME)
    (dataset.shards()[1]).unlink()
    with pytest.raises(DatasetError, match=r"part-00001.parquet' is missing: the version lists 3"):
        dataset.load()


def test_truncated_shard_is_refused_by_name(tmp_path):
    dataset = _dataset(tmp_path, rows_per_shard=4)
    dataset.save(FRAME)
    shard = dataset.shards()[2]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"part-00002.parquet' has \d+ bytes but was written"):
        dataset.load()


def test_versions_without_manifest_still_load(tmp_path):
    dataset = _dataset(tmp_path, rows_per_shard=4)
    dataset.save(FRAME)
    folder = dataset.shards()[0].parent
    assert json.loads((folder / "_manifest.json").read_text())["shards"][0]["rows"] == 4
    (folder / "_manifest.json").unlink()
    assert dataset.load().num_rows == 10


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="row_group_size must be >= 1, got 0"):
        _dataset(tmp_path, row_group_size=0)
    with pytest.raises(DatasetError, match="saves a pandas DataFrame or a ShardedTable, got list"):
        _dataset(tmp_path).save([1, 2])


def test_an_unversioned_table_is_replaced_whole_when_saved_again(tmp_path):
    """A second save failed with 'Directory not empty' (a rerun with an unversioned entry)."""
    dataset = ParquetShardsDataset(str(tmp_path / "table"), rows_per_shard=4)
    dataset.save(FRAME)
    dataset.save(FRAME.head(5))
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), FRAME.head(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]  # nothing left beside it
    dataset.save(dataset.load())  # a handle to the folder it replaces
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), FRAME.head(5))


def test_a_changed_byte_of_the_same_size_is_refused_when_read(tmp_path):
    """One flipped byte inside a page read cleanly as another value, and training used it."""
    frame = FRAME.assign(logprob=np.linspace(-9.0, -0.1, 10).astype(np.float32))
    dataset = _dataset(tmp_path, rows_per_shard=4)
    dataset.save(frame)
    shard = dataset.shards()[1]
    assert stat.S_IMODE(shard.stat().st_mode) & 0o222 == 0  # read-only once written
    footer = pq.read_metadata(shard)
    chunk = footer.row_group(0).column(footer.schema.names.index("logprob"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    offset = start + chunk.total_compressed_size - 2
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x5A
    shard.write_bytes(bytes(data))

    table = dataset.load()  # same size: the manifest cannot tell
    message = r"part-00001.parquet' failed its page checksum .*Re-run the stage"
    with pytest.raises(ShardError, match=message):
        table.to_pandas()
    with pytest.raises(ShardError, match=message):
        table.read_rows(1, 0, 2)
    with pytest.raises(ShardError, match=message):
        table.verify()
    assert table.read_rows(0, 0, 2)["logprob"].to_pylist() == frame["logprob"][:2].tolist()


def _flip_a_logprob_byte(shard) -> bytearray:
    footer = pq.read_metadata(shard)
    chunk = footer.row_group(0).column(footer.schema.names.index("logprob"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(shard.read_bytes())
    data[start + chunk.total_compressed_size - 2] ^= 0x5A
    return data


def test_pages_are_verified_once_per_handle_and_again_once_the_file_changes(tmp_path):
    """Re-reads of verified pages skip the checksum; a write since, even one that puts the
    modification time back, is caught by the same handle."""
    frame = FRAME.assign(logprob=np.linspace(-9.0, -0.1, 10).astype(np.float32))
    dataset = _dataset(tmp_path, rows_per_shard=4)
    dataset.save(frame)
    shard = dataset.shards()[1]
    table = dataset.load()
    assert table.read_rows(1, 0, 2)["logprob"].to_pylist() == frame["logprob"][4:6].tolist()
    assert table.read_rows(1, 0, 2)["logprob"].to_pylist() == frame["logprob"][4:6].tolist()
    data, before = _flip_a_logprob_byte(shard), shard.stat()
    time.sleep(0.05)  # a later write: the file system's clock has moved on
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    message = r"part-00001.parquet' failed its page checksum"
    with pytest.raises(ShardError, match=message):
        table.read_rows(1, 0, 2)
    with pytest.raises(ShardError, match=message):
        dataset.load().take_ranges([(4, 6)], ["position", "logprob"])
    assert table.read_rows(1, 0, 2, ["position"]).num_rows == 2  # other columns' pages are sound
