"""Every dataset of the project on a real S3 server: round trips, versions, refusals, lazy reads."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest
import s3fs.core
import torch
from kedro.io import DatasetError, Version

from cartridges import lineage
from cartridges.datasets import (
    AdapterDataset,
    CartridgeDataset,
    CartridgeHistoryDataset,
    CartridgeSetDataset,
    ParquetShardsDataset,
    PretrainedModelDataset,
    QuestionsDataset,
)
from cartridges.evaluation.questions import Question
from cartridges.initialization import from_text
from cartridges.storage import MANIFEST, Location, StoreConflictError, open_store
from cartridges.tables import ShardedTable, ShardError
from tests.conftest import CORPUS

FRAME = pd.DataFrame({"conversation_id": [f"c{i // 3}" for i in range(10)], "x": np.arange(10)})


@pytest.fixture
def prefix(s3):
    """A fresh key prefix per test: tests share one bucket."""
    return f"{s3.bucket}/{uuid.uuid4().hex[:12]}"


def _options(s3) -> dict:
    return {"credentials": s3.credentials, "fs_args": s3.fs_args}


def _shards(s3, prefix, version=None, **kwargs) -> ParquetShardsDataset:
    return ParquetShardsDataset(
        f"s3://{prefix}/table", version=Version(version, None), **_options(s3), **kwargs
    )


def test_a_shard_table_round_trips_lazily_with_its_attrs(s3, prefix):
    data = FRAME.copy()
    data.attrs = {"run_id": "abc"}
    _shards(s3, prefix, rows_per_shard=4, row_group_size=3).save(data)
    table = _shards(s3, prefix).load()
    assert isinstance(table, ShardedTable) and not table.store.is_local
    assert table.file_num_rows == [4, 4, 2] and table.attrs == {"run_id": "abc"}
    pd.testing.assert_frame_equal(table.to_pandas(), FRAME)
    assert table.take_ranges([(2, 7)])[0].to_pandas()["x"].tolist() == [2, 3, 4, 5, 6]
    assert table.filter_rows("conversation_id", ["c1"])["x"].tolist() == [3, 4, 5]
    assert len(table.fingerprint()) == 64
    # saved again from the handle: the shards are copied from the store into a new version
    _shards(s3, prefix, rows_per_shard=4).save(table)
    pd.testing.assert_frame_equal(_shards(s3, prefix).load().to_pandas(), FRAME)


def test_a_version_without_its_manifest_is_not_a_version(s3, prefix):
    """An upload stopped before its manifest (the commit) leaves no version a load would pick."""
    dataset = _shards(s3, prefix, rows_per_shard=4)
    dataset.save(FRAME)
    done = dataset.resolve_save_version()
    fs = s3.filesystem()
    partial = f"{prefix}/table/2999-01-01T00.00.00.000Z/table"
    fs.pipe(f"{partial}/part-00000.parquet", b"half an upload")  # newer, but never committed
    assert _shards(s3, prefix).resolve_load_version() == done
    with pytest.raises(DatasetError, match="No saved version at 's3://"):
        _shards(s3, prefix, version="2999-01-01T00.00.00.000Z").load()


def test_a_truncated_or_deleted_shard_is_refused_naming_its_url(s3, prefix):
    _shards(s3, prefix, rows_per_shard=4).save(FRAME)
    shard = f"{prefix}/table/{_shards(s3, prefix).resolve_load_version()}/table/part-00001.parquet"
    fs = s3.filesystem()
    whole = fs.cat(shard)
    fs.pipe(shard, whole[:-10])
    with pytest.raises(DatasetError, match=f"Shard 's3://{shard}' has .* bytes but was written"):
        _shards(s3, prefix).load()
    fs.rm(shard)
    with pytest.raises(DatasetError, match=f"Shard 's3://{shard}' is missing"):
        _shards(s3, prefix).load()


def test_a_changed_byte_is_refused_by_the_same_handle(s3, prefix):
    """The page checksums hold on a store: a rewrite of the same size changes the ETag, so a
    handle that verified the file before verifies it again."""
    frame = pd.DataFrame({"x": np.arange(20_000, dtype=np.int64)})
    _shards(s3, prefix, row_group_size=5_000).save(frame)
    table = _shards(s3, prefix).load()
    assert table.read_rows(0, 0, 20_000, ["x"]).num_rows == 20_000  # verified once
    fs = s3.filesystem()
    path = str(table.files[0])
    data = bytearray(fs.cat(path))
    data[len(data) // 3] ^= 0xFF
    fs.pipe(path, bytes(data))
    with pytest.raises(ShardError, match=f"Shard 's3://{path}' failed its page checksum"):
        table.read_rows(0, 0, 20_000, ["x"])


def test_reading_rows_fetches_their_row_groups_not_the_shard(s3, prefix, monkeypatch):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.integers(0, 2**62, size=400_000, dtype=np.int64)})
    _shards(s3, prefix, row_group_size=10_000).save(frame)
    table = _shards(s3, prefix).load()
    size = s3.filesystem().size(str(table.files[0]))
    table.metadata(0)  # the footer, once per handle
    fetched = []
    original = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        fetched.append(end - start)
        return original(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    rows = table.read_rows(0, 200_000, 200_100, ["x"])
    assert rows.column("x").to_pylist() == frame["x"].iloc[200_000:200_100].tolist()
    assert 0 < sum(fetched) < size / 4, (sum(fetched), size)


def test_cartridges_sets_and_history_on_the_store(tiny, s3, prefix):
    model, tokenizer = tiny
    cartridge = from_text(model, tokenizer, CORPUS, num_tokens=8)
    url = f"s3://{prefix}/cartridge.safetensors"
    for version in ("2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"):
        CartridgeDataset(url, version=Version(None, version), **_options(s3)).save(cartridge)
    latest = CartridgeDataset(url, version=Version(None, None), **_options(s3))
    assert latest.exists() and latest.header()["num_tokens"] == "8"
    loaded = latest.load()
    assert torch.equal(loaded.trainable_keys, cartridge.trainable_keys)
    assert loaded.info.extra["catalog_version"] == "2026-01-02T00.00.00.000Z"
    history = CartridgeHistoryDataset(url, **_options(s3)).load()
    assert history.versions() == ["2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"]
    assert history.load("2026-01-01T00.00.00.000Z").num_tokens == 8

    sweep = CartridgeSetDataset(f"s3://{prefix}/sweep", version=Version(None, None), **_options(s3))
    sweep.save({"p4": from_text(model, tokenizer, CORPUS, num_tokens=4), "p8": cartridge})
    loaded_set = CartridgeSetDataset(
        f"s3://{prefix}/sweep", version=Version(None, None), **_options(s3)
    ).load()
    assert sorted(loaded_set) == ["p4", "p8"] and loaded_set["p4"].num_tokens == 4


def test_a_damaged_cartridge_on_the_store_is_named_by_its_url(tiny, s3, prefix):
    model, tokenizer = tiny
    url = f"s3://{prefix}/c.safetensors"
    dataset = CartridgeDataset(
        url, version=Version(None, "2026-01-01T00.00.00.000Z"), **_options(s3)
    )
    dataset.save(from_text(model, tokenizer, CORPUS, num_tokens=8))
    key = f"{prefix}/c.safetensors/2026-01-01T00.00.00.000Z/c.safetensors"
    fs = s3.filesystem()
    data = bytearray(fs.cat(key))
    data[-3] ^= 0xFF
    fs.pipe(key, bytes(data))
    with pytest.raises(DatasetError, match=f"Cartridge 's3://{key}' does not hold the bytes"):
        CartridgeDataset(url, version=Version(None, None), **_options(s3)).load()


def test_adapters_and_questions_on_the_store(s3, prefix):
    files = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"\x00\x01"}
    AdapterDataset(f"s3://{prefix}/lora", version=Version(None, None), **_options(s3)).save(files)
    adapter = AdapterDataset(f"s3://{prefix}/lora", version=Version(None, None), **_options(s3))
    assert adapter.load() == files  # the manifest is not an adapter file
    questions = [Question("Who built it?", "Halvard", document="pump")]
    dataset = QuestionsDataset(f"s3://{prefix}/questions.jsonl", **_options(s3))
    dataset.save(questions)
    assert dataset.exists() and dataset.load() == questions
    with pytest.raises(DatasetError, match=f"Questions file 's3://{prefix}/none.jsonl' not found"):
        QuestionsDataset(f"s3://{prefix}/none.jsonl", **_options(s3)).load()


def test_a_write_if_absent_refuses_a_second_writer(s3, prefix):
    store, path = open_store(f"s3://{prefix}/lock", **_options(s3))
    store.put_if_absent(path, b"first")
    with pytest.raises(StoreConflictError, match="already exists"):
        store.put_if_absent(path, b"second")
    assert store.read_bytes(path) == b"first"


def test_folder_versions_carry_a_manifest_listing_their_files(s3, prefix):
    files = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"\x00\x01\x02"}
    dataset = AdapterDataset(f"s3://{prefix}/lora", version=Version(None, None), **_options(s3))
    dataset.save(files)
    folder = f"{prefix}/lora/{dataset.resolve_save_version()}/lora"
    manifest = json.loads(s3.filesystem().cat(f"{folder}/{MANIFEST}"))
    assert manifest == {
        "files": [
            {"file": "adapter_config.json", "bytes": 8},
            {"file": "adapter_model.safetensors", "bytes": 3},
        ]
    }


def test_the_lineage_of_an_artifact_on_the_store_is_read_from_its_url(
    tiny, s3, prefix, monkeypatch
):
    for name, value in s3.environment.items():  # the CLI's client reads the environment
        monkeypatch.setenv(name, value)
    data = FRAME.copy()
    data.attrs = {lineage.LINEAGE: {"dataset": "teacher_logprobs", "version": "v1"}}
    dataset = _shards(s3, prefix)
    dataset.save(data)
    folder = f"s3://{prefix}/table/{dataset.resolve_save_version()}/table"
    assert lineage.read(folder)["version"] == "v1"
    model, tokenizer = tiny
    cartridge = from_text(model, tokenizer, CORPUS, num_tokens=4)
    cartridge.info.extra[lineage.LINEAGE] = {"dataset": "cartridge", "version": "v2"}
    CartridgeDataset(f"s3://{prefix}/c.safetensors", **_options(s3)).save(cartridge)
    assert lineage.read(f"s3://{prefix}/c.safetensors")["version"] == "v2"


def test_an_answer_holding_a_line_separator_stays_one_question(tmp_path):
    questions = [Question("Which line?", "one\u2028two\x85three")]
    dataset = QuestionsDataset(str(tmp_path / "q.jsonl"))
    dataset.save(questions)
    assert dataset.load() == questions


def test_a_home_relative_path_means_one_place_for_reads_and_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    location = Location.of("~/checkpoints") / "state.pt"
    location.write_bytes(b"x")
    assert (tmp_path / "checkpoints" / "state.pt").read_bytes() == b"x"
    assert location.is_file() and location.read_bytes() == b"x"


def test_loading_many_shards_lists_the_folder_once_instead_of_one_request_per_shard(
    s3, prefix, monkeypatch
):
    frame = pd.DataFrame({"x": np.arange(40)})
    _shards(s3, prefix, rows_per_shard=2).save(frame)  # 20 shards
    dataset = _shards(s3, prefix)
    calls = []
    original = s3fs.core.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Key", "")))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", counting)
    table = dataset.load()
    assert len(table.files) == 20
    assert not [key for _, key in calls if "part-" in key], calls  # no request per shard
    assert len(calls) < 15, calls  # finding the version, its manifest, one listing


def test_credentials_with_client_options_keep_the_endpoint_of_fs_args(s3, prefix):
    credentials = {**s3.credentials, "client_kwargs": {"region_name": "us-east-1"}}
    dataset = ParquetShardsDataset(
        f"s3://{prefix}/table", credentials=credentials, fs_args=s3.fs_args
    )
    assert dataset._store.fs.client_kwargs == {
        "endpoint_url": s3.endpoint,
        "region_name": "us-east-1",
    }
    dataset.save(FRAME)
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), FRAME)


def test_a_version_from_before_manifests_loads_only_its_parquet_shards(tmp_path):
    folder = tmp_path / "table" / "2020-01-01T00.00.00.000Z" / "table"
    folder.mkdir(parents=True)
    FRAME.to_parquet(folder / "part-00000.parquet")
    (folder / "part-00000.parquet.crc").write_bytes(b"a checksum file beside it")
    dataset = ParquetShardsDataset(str(tmp_path / "table"), version=Version(None, None))
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), FRAME)


def test_removing_a_version_on_the_store_uncommits_it_before_deleting_its_files(
    s3, prefix, monkeypatch
):
    """A run that saved one output of a node but not the other removes the saved version (the
    hooks): a removal cut short must not leave it loadable as the latest."""
    dataset = _shards(s3, prefix, rows_per_shard=4)
    dataset.save(FRAME)
    version = dataset.resolve_save_version()
    store, folder = open_store(f"s3://{prefix}/table/{version}", **_options(s3))

    def cut(*args, **kwargs):
        raise ConnectionError("cut short")

    monkeypatch.setattr(store.fs, "rm", cut)
    with pytest.raises(ConnectionError):
        store.remove(folder)
    assert store.children(f"{folder}/table")  # the shards are still there...
    with pytest.raises(DatasetError, match="No saved version at"):  # ...but no version
        _shards(s3, prefix, version=version).load()


def test_a_model_save_cut_short_on_the_store_leaves_no_model_to_load(tiny, s3, prefix):
    model, tokenizer = tiny
    dataset = PretrainedModelDataset(f"s3://{prefix}/model", **_options(s3))
    dataset.save((model, tokenizer))
    loaded, _ = dataset.load()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    class Crashing:
        def save_pretrained(self, directory):
            (directory / "config.json").write_text("{}")
            raise OSError("disk full")

    with pytest.raises(DatasetError, match="Failed while saving"):
        dataset.save((model, Crashing()))
    assert dataset.exists()
    s3.filesystem().rm_file(f"{prefix}/model/{MANIFEST}")  # an upload cut before its commit
    assert not dataset.exists()
    with pytest.raises(DatasetError, match=f"No model saved at 's3://{prefix}/model'"):
        dataset.load()


def _counting_requests(monkeypatch) -> list[tuple[str, dict]]:
    calls = []
    original = s3fs.core.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append((method, kwargs))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", counting)
    return calls


def test_reads_after_the_first_send_no_head_and_every_get_is_pinned_to_the_etag(
    s3, prefix, monkeypatch
):
    frame = pd.DataFrame({"x": np.arange(20_000, dtype=np.int64)})
    _shards(s3, prefix, row_group_size=5_000).save(frame)
    table = _shards(s3, prefix).load()
    table.read_rows(0, 0, 10, ["x"])  # the first read asks for the size and ETag (a HEAD)
    etag = s3.filesystem().info(str(table.files[0]))["ETag"]
    calls = _counting_requests(monkeypatch)
    assert table.read_rows(0, 12_000, 12_010, ["x"])["x"].to_pylist() == list(range(12_000, 12_010))
    assert [method for method, _ in calls] == ["get_object"]
    assert calls[0][1]["IfMatch"] == etag


def test_a_shard_replaced_between_reads_is_read_afresh_not_mixed(s3, prefix, monkeypatch):
    frame = pd.DataFrame({"x": np.arange(20_000, dtype=np.int64)})
    _shards(s3, prefix, row_group_size=5_000).save(frame)
    table = _shards(s3, prefix).load()
    assert table.read_rows(0, 0, 3, ["x"])["x"].to_pylist() == [0, 1, 2]
    path = str(table.files[0])
    with s3.filesystem().open(path, "wb") as handle:  # another writer: new rows, new footer
        pd.DataFrame({"x": np.arange(20_000, dtype=np.int64) + 7}).to_parquet(
            handle, row_group_size=1_000
        )
    calls = _counting_requests(monkeypatch)
    assert table.read_rows(0, 0, 3, ["x"])["x"].to_pylist() == [7, 8, 9]
    methods = [method for method, _ in calls]
    assert methods[0] == "get_object" and "head_object" in methods  # refused, then asked afresh


def test_a_table_saved_within_the_store_is_copied_by_the_server_not_downloaded(
    s3, prefix, monkeypatch
):
    _shards(s3, prefix, rows_per_shard=4).save(FRAME)  # 3 shards
    table = _shards(s3, prefix).load()
    table.file_num_rows  # noqa: B018 - the footers, read before counting
    calls = _counting_requests(monkeypatch)
    copy = ParquetShardsDataset(f"s3://{prefix}/copy", version=Version(None, None), **_options(s3))
    copy.save(table)
    shard_requests = [method for method, kwargs in calls if "part-" in kwargs.get("Key", "")]
    assert shard_requests.count("copy_object") == 3, shard_requests
    assert not {"get_object", "put_object", "upload_part"} & set(shard_requests)  # no byte moved
    loaded = ParquetShardsDataset(
        f"s3://{prefix}/copy", version=Version(None, None), **_options(s3)
    )
    pd.testing.assert_frame_equal(loaded.load().to_pandas(), FRAME)


def test_the_footers_kept_in_memory_are_bounded_however_many_shards_are_read(
    s3, prefix, monkeypatch
):
    monkeypatch.setattr("cartridges.tables._FOOTERS_KEPT", 4)
    frame = pd.DataFrame({"x": np.arange(40)})
    _shards(s3, prefix, rows_per_shard=2).save(frame)  # 20 shards
    table = _shards(s3, prefix).load()
    for _ in range(2):  # the second pass fetches the evicted footers again
        rows = table.take_ranges([(i, i + 1) for i in range(0, 40, 2)], ["x"])
        assert [r["x"][0].as_py() for r in rows] == list(range(0, 40, 2))
        assert len(table._footers) <= 4


def test_an_unversioned_table_saved_over_its_own_folder_keeps_its_rows(s3, prefix):
    """Its old files are removed before the new ones land: they are downloaded, not copied."""
    dataset = ParquetShardsDataset(f"s3://{prefix}/table", rows_per_shard=4, **_options(s3))
    dataset.save(FRAME)
    dataset.save(dataset.load())
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), FRAME)
