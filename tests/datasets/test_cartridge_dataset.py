"""The versioned catalog dataset for cartridges."""

from __future__ import annotations

import shutil

import pytest
import torch
from kedro.io import DatasetError, Version

from cartridges import lineage
from cartridges.datasets import CartridgeDataset
from cartridges.initialization import from_text
from tests.conftest import CORPUS


def test_versioned_save_and_load(tiny, tmp_path):
    model, tokenizer = tiny
    cartridge = from_text(model, tokenizer, CORPUS, num_tokens=12)
    filepath = str(tmp_path / "cartridge.safetensors")
    first = CartridgeDataset(filepath, version=Version(None, "2026-01-01T00.00.00.000Z"))
    first.save(cartridge)
    original = cartridge.trainable_keys.detach().clone()
    with torch.no_grad():
        cartridge.trainable_keys.add_(1.0)
    CartridgeDataset(filepath, version=Version(None, "2026-01-02T00.00.00.000Z")).save(cartridge)

    latest = CartridgeDataset(filepath, version=Version(None, None))
    assert latest.exists()
    assert torch.equal(latest.load().trainable_keys, cartridge.trainable_keys)
    pinned = CartridgeDataset(filepath, version=Version("2026-01-01T00.00.00.000Z", None))
    assert torch.equal(pinned.load().trainable_keys, original)
    assert pinned.header()["num_tokens"] == "12"
    assert not CartridgeDataset(str(tmp_path / "none.safetensors"), Version(None, None)).exists()


def test_a_cartridge_copied_into_another_versions_folder_is_refused(tiny, tmp_path):
    """A copy was reported under the folder's version, as if it had been saved there."""
    model, tokenizer = tiny
    cartridge = from_text(model, tokenizer, CORPUS, num_tokens=12)
    filepath = tmp_path / "cartridge.safetensors"
    first, second = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
    for version in (first, second):
        cartridge.info.extra[lineage.LINEAGE] = {"dataset": "cartridge", "version": version}
        CartridgeDataset(str(filepath), version=Version(None, version)).save(cartridge)
    loaded = CartridgeDataset(str(filepath), version=Version(first, None)).load()
    assert loaded.info.extra["catalog_version"] == first
    name = "cartridge.safetensors"
    shutil.copyfile(filepath / first / name, filepath / second / name)
    with pytest.raises(DatasetError, match=rf"version {second} .* saved as version {first}"):
        CartridgeDataset(str(filepath), version=Version(None, None)).load()
