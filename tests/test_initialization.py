"""Cartridge initialisers."""

from __future__ import annotations

import pytest
import torch

from cartridges.initialization import (
    from_cartridge,
    from_random_tokens,
    from_random_vectors,
    from_text,
    kv_of_tokens,
)
from tests.conftest import CORPUS


def test_from_text_holds_the_kv_of_the_first_p_tokens(tiny):
    model, tokenizer = tiny
    cartridge = from_text(model, tokenizer, CORPUS, num_tokens=16)
    ids = tokenizer(CORPUS)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the frozen sink is the bos token
    keys, values = kv_of_tokens(model, ids)
    assert torch.allclose(cartridge.keys, keys[:, :, :16], atol=1e-6)
    assert torch.allclose(cartridge.values, values[:, :, :16], atol=1e-6)
    assert cartridge.info.initializer == "text" and len(cartridge.info.source_sha256) == 64


def test_from_text_refuses_p_larger_than_the_text(tiny):
    model, tokenizer = tiny
    n = len(tokenizer("short text")["input_ids"])
    with pytest.raises(ValueError, match=f"p=500 tokens from a text of only {n} tokens"):
        from_text(model, tokenizer, "short text", num_tokens=500)


def test_random_tokens_start_with_bos_and_are_seeded(tiny):
    model, tokenizer = tiny
    first = from_random_tokens(model, tokenizer, 12, generator=torch.Generator().manual_seed(0))
    again = from_random_tokens(model, tokenizer, 12, generator=torch.Generator().manual_seed(0))
    bos_keys, _ = kv_of_tokens(model, [tokenizer.bos_token_id])
    assert torch.allclose(first.keys[:, :, :1], bos_keys, atol=1e-6)
    assert torch.equal(first.keys, again.keys)


def test_random_vectors_have_the_right_shape_and_spread(tiny):
    model, _ = tiny
    cartridge = from_random_vectors(model, 64, generator=torch.Generator().manual_seed(0))
    assert cartridge.keys.shape == (2, 2, 64, 16)
    assert 0.1 < cartridge.keys.std() / kv_of_tokens(model, list(range(16)))[0].std() < 10


def test_from_cartridge_copies_without_sharing_storage(tiny):
    model, tokenizer = tiny
    source = from_text(model, tokenizer, CORPUS, num_tokens=8)
    copy = from_cartridge(source, num_frozen_tokens=2)
    assert torch.equal(copy.keys, source.keys) and copy.num_frozen_tokens == 2
    with torch.no_grad():
        copy.trainable_keys.zero_()
    assert source.trainable_keys.abs().sum() > 0
