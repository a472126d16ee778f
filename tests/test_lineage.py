"""Lineage records: bound self-study pairs, transitive inputs, and reading them back."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from kedro.io import Version

from cartridges import lineage
from cartridges.datasets import CartridgeDataset, ParquetShardsDataset
from cartridges.initialization import from_token_ids
from cartridges.tables import ShardedTable


def _table(tmp_path, name: str, run_id: str | None) -> ShardedTable:
    frame = pd.DataFrame({"conversation_id": ["conv-000000-000"], "num_tokens": [3]})
    table = ShardedTable.from_dataframe(frame, tmp_path / f"{name}.parquet")
    if run_id is not None:
        table.attrs[lineage.RUN_ID] = run_id
    return table


def test_a_pair_from_different_runs_is_refused_naming_both_versions_and_the_fix(tmp_path):
    conversations = _table(tmp_path, "c", "run-a-64")
    targets = _table(tmp_path, "t", "run-b-64")
    with pytest.raises(lineage.LineageError) as error:
        lineage.check_pair(
            conversations, targets, ("V1", "V2"), "conversations:V1,teacher_logprobs:V0"
        )
    message = str(error.value)
    assert "version V1" in message and "version V2" in message
    assert "run-a-64" in message and "run-b-64" in message
    assert '--load-versions "conversations:V1,teacher_logprobs:V0"' in message
    lineage.check_pair(conversations, _table(tmp_path, "same", "run-a-64"))  # bound: fine
    lineage.check_pair(conversations, _table(tmp_path, "old", None))  # unknown: not refused


def test_the_run_id_survives_the_catalog_round_trip(tmp_path):
    dataset = ParquetShardsDataset(str(tmp_path / "targets"), version=Version(None, None))
    dataset.save(_table(tmp_path, "t", "run-a-64"))
    assert dataset.load().attrs[lineage.RUN_ID] == "run-a-64"


def test_inputs_are_transitive_and_direct_versions_win(tmp_path):
    upstream = _table(tmp_path, "c", "run-a")
    upstream.attrs[lineage.LINEAGE] = {
        "inputs": {"chunk_set": {"version": "V0"}, "corpus": {"version": "V-1"}}
    }
    corpus = pd.DataFrame({"text": ["pump"]})
    merged = lineage.merge_inputs({"conversations": ("V1", upstream), "corpus": ("V-2", corpus)})
    assert merged["chunk_set"] == {"version": "V0"}
    assert merged["corpus"]["version"] == "V-2"  # read directly: this version was used
    assert merged["conversations"]["version"] == "V1"
    assert merged["conversations"][lineage.RUN_ID] == "run-a"
    assert len(merged["conversations"]["digest"]) == 16
    assert lineage.digest(corpus) != lineage.digest(pd.DataFrame({"text": ["valve"]}))


def test_an_input_made_from_another_version_of_a_sibling_input_is_refused(tmp_path):
    """A chunk set of another corpus beside conversations of this one trained with rc 0."""
    ours, theirs = pd.DataFrame({"text": ["pump"]}), pd.DataFrame({"text": ["valve"]})
    conversations = _table(tmp_path, "c", "run-a")
    conversations.attrs[lineage.LINEAGE] = {
        "inputs": {"chunk_set": {"version": "V0", "digest": lineage.digest(ours)}}
    }
    lineage.check_consistent({"conversations": ("V1", conversations), "chunk_set": ("V0", ours)})
    with pytest.raises(lineage.LineageError) as error:
        lineage.check_consistent(
            {"conversations": ("V1", conversations), "chunk_set": ("V2", theirs)}
        )
    message = str(error.value)
    assert "conversations (version V1) was made from chunk_set version V0" in message
    assert "reads chunk_set version V2" in message and lineage.digest(theirs) in message
    assert '--load-versions "chunk_set:V0"' in message
    # A sweep (a dict of cartridges) is checked item by item; inputs without a digest pass.
    cartridge_like = _table(tmp_path, "s", None)
    cartridge_like.attrs[lineage.LINEAGE] = conversations.attrs[lineage.LINEAGE]
    with pytest.raises(lineage.LineageError):
        lineage.check_consistent(
            {"sweep": (None, {"p4": cartridge_like}), "chunk_set": ("V2", theirs)}
        )
    unknown = _table(tmp_path, "u", None)
    unknown.attrs[lineage.LINEAGE] = {"inputs": {"chunk_set": {"version": "V0"}}}
    lineage.check_consistent({"conversations": ("V1", unknown), "chunk_set": ("V2", theirs)})


def test_a_cartridge_keeps_its_record_in_its_file_and_the_cli_prints_it(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    cartridge = from_token_ids(model, tokenizer("pump seal")["input_ids"])
    record = {
        "dataset": "cartridge",
        "version": "2026-01-02T00.00.00.000Z",
        **lineage.code_identity(),
        "inputs": {"conversations": {"version": "V1", "digest": "abc", "run_id": "r-8"}},
    }
    assert lineage.attach(cartridge, record)
    saved_as = Version(None, record["version"])  # the version its record names
    CartridgeDataset(str(tmp_path / "c.safetensors"), version=saved_as).save(cartridge)
    dataset = CartridgeDataset(str(tmp_path / "c.safetensors"), version=Version(None, None))
    (path,) = (tmp_path / "c.safetensors").glob("*/c.safetensors")
    assert lineage.read(path) == record
    assert lineage.get(dataset.load()) == record
    lineage.main([str(path)])
    printed = capsys.readouterr().out
    assert "cartridge @ 2026-01-02T00.00.00.000Z" in printed
    assert "<- conversations @ V1 (digest abc, run_id r-8)" in printed
    lineage.main([str(path), "--json"])
    assert json.loads(capsys.readouterr().out) == record
    with pytest.raises(FileNotFoundError, match="No cartridge file"):
        lineage.read(tmp_path / "missing")
