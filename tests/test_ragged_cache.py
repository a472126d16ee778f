"""The ragged cache: rows of any length come and go; their tokens and state stay theirs."""

from __future__ import annotations

import torch

from cartridges.cartridge import Cartridge
from cartridges.decoding.ragged_cache import RaggedCache
from cartridges.decoding.shared_prefix import INVALID_POSITION
from cartridges.modeling import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2)


def _feed(cache: RaggedCache, rows, tokens: list[list[float]]):
    """One forward: row ``b`` feeds ``tokens[b]`` (keys = values = those numbers); its own keys."""
    width = max(len(t) for t in tokens)
    step = cache.step_cache(rows, [len(t) for t in tokens], width)
    padded = torch.tensor([[0.0] * (width - len(t)) + t for t in tokens])  # [B, T], left-padded
    states = padded[:, None, :, None].expand(-1, 1, -1, 2)  # [B, Hkv, T, D]
    for layer in range(LAYOUT.num_layers):
        keys, values = step.update(states, states, layer)
    padding = step.batch.key_positions == INVALID_POSITION  # read, but never attended to
    return step, keys[:, 0, :, 0].masked_fill(padding, 0.0)  # [B, L]: own keys, right-padded


def test_rows_keep_their_tokens_while_others_join_leave_and_the_pool_grows():
    cache = RaggedCache(LAYOUT, torch.float32, "cpu", block_size=2, num_blocks=1)
    first, second = cache.add_row(None), cache.add_row(None)
    _feed(cache, [first, second], [[1.0, 2.0, 3.0], [4.0]])
    assert cache.pool.shape[2] > 2  # grown from one block of two slots
    third = cache.add_row(None)
    step, keys = _feed(cache, [second, third, first], [[5.0], [6.0, 7.0], [8.0]])
    assert keys.tolist() == [[4.0, 5.0, 0.0, 0.0], [6.0, 7.0, 0.0, 0.0], [1.0, 2.0, 3.0, 8.0]]
    assert step.batch.key_positions[0].tolist() == [0, 1, INVALID_POSITION, INVALID_POSITION]
    assert step.batch.query_positions.tolist() == [[1, 1], [0, 1], [3, 3]]  # padding: first new
    blocks = list(first.blocks)
    cache.remove_row(second)
    assert first.blocks == blocks and cache.memory().own_tokens == 6
    fourth = cache.add_row(None)
    _, keys = _feed(cache, [fourth, first], [[9.0], [10.0]])  # takes a freed block
    assert keys.tolist() == [[9.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 8.0, 10.0]]


def test_each_prefix_is_stored_once_and_dropped_with_its_last_row():
    cache = RaggedCache(LAYOUT, torch.float32, "cpu")
    cartridge = Cartridge(torch.randn(2, 1, 5, 2), torch.randn(2, 1, 5, 2))
    rows = [cache.add_row(cartridge) for _ in range(3)]
    assert len({id(row.prefix) for row in rows}) == 1 and cache.prefix_tokens == 5
    step, _ = _feed(cache, rows, [[1.0], [2.0, 3.0], [4.0]])
    assert step.batch.groups == [(rows[0].prefix, None)]  # one group: all rows
    assert step.batch.query_positions.tolist() == [[5, 5], [5, 6], [5, 5]]
    for row in rows:
        cache.remove_row(row)
        assert cache.holds(cartridge) == (row is not rows[-1])
    assert cache.memory().prefix_bytes == 0


def test_state_a_model_keeps_on_the_cache_follows_its_rows():
    cache = RaggedCache(LAYOUT, torch.float32, "cpu")
    first, second, third = (cache.add_row(None) for _ in range(3))
    step = cache.step_cache([first, second], [1, 1], 1)
    step.last_ids = torch.tensor([[1, 1], [2, 2]])  # per row: kept
    step.shared = torch.tensor([7])  # not per row: dropped
    step.keep_row_state()
    assert first.state["last_ids"].tolist() == [[1, 1]] and set(second.state) == {"last_ids"}
    step = cache.step_cache([second, first], [1, 1], 1)
    assert step.last_ids.tolist() == [[2, 2], [1, 1]]  # in this forward's row order
    step = cache.step_cache([third, first], [1, 1], 1)
    assert not hasattr(step, "last_ids")  # a new row has none: the model starts afresh
