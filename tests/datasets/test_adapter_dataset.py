"""The versioned dataset holding a PEFT adapter directory."""

from __future__ import annotations

import pytest
from kedro.io import DatasetError, Version

from cartridges.datasets import AdapterDataset

FILES = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"\x00\x01"}


def test_an_adapter_round_trips_and_versions_are_whole_folders(tmp_path):
    dataset = AdapterDataset(str(tmp_path / "lora"), version=Version(None, None))
    dataset.save(FILES)
    assert AdapterDataset(str(tmp_path / "lora"), version=Version(None, None)).load() == FILES
    assert not list((tmp_path / "lora").rglob("*.tmp"))  # written aside, then renamed


def test_files_that_are_no_adapter_or_escape_the_folder_are_refused(tmp_path):
    dataset = AdapterDataset(str(tmp_path / "lora"), version=Version(None, None))
    with pytest.raises(DatasetError, match="Not a PEFT adapter: no adapter_config.json"):
        dataset.save({"weights.bin": b""})
    with pytest.raises(DatasetError, match="Adapter file name '../x' must be a plain file name"):
        dataset.save({**FILES, "../x": b""})
    assert not dataset.exists()
