"""The versioned catalog dataset for cartridges."""

from __future__ import annotations

import torch
from kedro.io import Version

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
