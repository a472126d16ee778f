"""The trainable cartridge: what trains, what stays frozen, composition, validation."""

from __future__ import annotations

import pytest
import torch

from cartridges.cartridge import Cartridge, CartridgeMismatchError, compose
from cartridges.initialization import from_token_ids
from cartridges.prefix import forward_with_prefix, prefixed_positions
from tests.architectures import build_model

DOCUMENT = list(range(5, 45))
QUERY = torch.tensor([[50, 51, 52, 53]])


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


def test_one_optimizer_step_moves_only_trainable_positions(model):
    cartridge = from_token_ids(model, DOCUMENT, num_frozen_tokens=1)
    sink_keys, sink_values = cartridge.frozen_keys.clone(), cartridge.frozen_values.clone()
    before = cartridge.trainable_keys.detach().clone()
    optimizer = torch.optim.Adam(cartridge.parameters(), lr=1e-2)
    logits = forward_with_prefix(model, cartridge.as_cache(1, model.config), QUERY).logits
    logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert torch.equal(cartridge.frozen_keys, sink_keys)
    assert torch.equal(cartridge.frozen_values, sink_values)
    assert not cartridge.frozen_keys.requires_grad
    assert (cartridge.trainable_keys.detach() - before).abs().amax(dim=(0, 1, 3)).min() > 0
    assert all(p.grad is None for p in model.parameters())
    assert [name for name, _ in cartridge.named_parameters()] == [
        "trainable_keys",
        "trainable_values",
    ]


def test_shapes_and_sizes(model):
    cartridge = from_token_ids(model, DOCUMENT, num_frozen_tokens=2)
    assert cartridge.keys.shape == (2, 2, 40, 16)  # layers, kv heads, p, head_dim
    assert cartridge.num_tokens == 40 and cartridge.num_frozen_tokens == 2
    assert cartridge.kv_bytes == 2 * 2 * 2 * 40 * 16 * 4


def test_bad_shapes_and_frozen_counts_are_refused():
    keys = torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"must both have shape \(layers, kv_heads, p, head_dim\)"):
        Cartridge(keys, torch.zeros(2, 2, 7, 16))
    with pytest.raises(ValueError, match=r"num_frozen_tokens must lie in \[0, p=8\], got 9"):
        Cartridge(keys, keys, num_frozen_tokens=9)


def test_composition_concatenates_in_order_and_positions_follow_the_whole_prefix(model):
    whole = from_token_ids(model, DOCUMENT)
    first = Cartridge(whole.keys[:, :, :25], whole.values[:, :, :25], 1, whole.info)
    second = Cartridge(whole.keys[:, :, 25:], whole.values[:, :, 25:], 0, whole.info)
    composed = compose([first, second])
    assert composed.num_tokens == 40 and composed.num_frozen_tokens == 1
    assert torch.equal(composed.keys, whole.keys)
    assert composed.info.extra["components"] == [25, 15]
    reference = model(input_ids=torch.tensor([DOCUMENT + QUERY[0].tolist()]))
    logits = forward_with_prefix(model, composed.as_cache(1, model.config), QUERY).logits
    assert (logits[0] - reference.logits[0, 40:]).abs().max() <= 1e-5
    reversed_order = compose([second, first])
    assert torch.equal(reversed_order.keys[:, :, :15], second.keys)


def test_composing_with_an_empty_cartridge_changes_nothing(model):
    cartridge = from_token_ids(model, DOCUMENT)
    empty = Cartridge.empty_like(cartridge)
    assert empty.num_tokens == 0
    for parts in ([cartridge, empty], [empty, cartridge]):
        composed = compose(parts)
        assert torch.equal(composed.keys, cartridge.keys)
        assert torch.equal(composed.values, cartridge.values)
    plain = forward_with_prefix(model, cartridge.as_cache(1, model.config), QUERY).logits
    padded = forward_with_prefix(
        model, compose([cartridge, empty]).as_cache(1, model.config), QUERY
    ).logits
    assert torch.equal(plain, padded)


def test_composition_refuses_mismatched_layouts(model):
    cartridge = from_token_ids(model, DOCUMENT)
    with pytest.raises(CartridgeMismatchError, match="different KV layouts"):
        compose([cartridge, from_token_ids(build_model("gpt_neox"), DOCUMENT)])
    same_shape_other_model = from_token_ids(build_model("qwen3"), DOCUMENT)
    with pytest.raises(CartridgeMismatchError, match="made for different models"):
        compose([cartridge, same_shape_other_model])
    with pytest.raises(ValueError, match="at least one cartridge"):
        compose([])


def test_positions_after_a_prefix_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    positions = prefixed_positions(10, mask)
    assert positions.tolist() == [[10, 10, 10, 11], [10, 11, 12, 13], [10, 11, 11, 11]]


def test_a_model_with_another_kv_layout_is_refused_naming_both_layouts(model):
    other = build_model("llama", num_key_value_heads=1)
    cartridge = from_token_ids(other, DOCUMENT)
    layouts = r"\(layers=2, kv_heads=1, head_dim=16, .*\(layers=2, kv_heads=2, head_dim=16\)"
    for check in (cartridge.check_layout, cartridge.check_compatible):
        with pytest.raises(CartridgeMismatchError, match=layouts):
            check(model)
    cartridge.check_compatible(other)
