"""Block-sparse packed rows: the mask, both kernels, exactness per architecture, the fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import LlamaForCausalLM

from cartridges import attention
from cartridges.attention import PackedLayout, choose_attention, segment_starts
from cartridges.batching import make_batch, packed_batch
from cartridges.initialization import from_cartridge, from_token_ids
from cartridges.objective import CartridgeStudent
from cartridges.prefix import forward_with_prefix
from cartridges.training import TrainConfig, train_cartridge
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, build_model
from tests.training_data import assert_rows_match_alone, make_examples, setting


def _segments(lengths_per_row: list[list[int]], row_length: int) -> torch.Tensor:
    segments = torch.full((len(lengths_per_row), row_length), -1)
    for row, lengths in enumerate(lengths_per_row):
        offset = 0
        for index, n in enumerate(lengths):
            segments[row, offset : offset + n] = index
            offset += n
    return segments


def _reference_allowed(segments: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """``[B, T, p + T]`` written out from segments: prefix, then same conversation and causal."""
    batch, length = segments.shape
    allowed = torch.zeros((batch, length, prefix_len + length), dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            allowed[b, q, :prefix_len] = True
            for k in range(q + 1):
                if segments[b, q] >= 0 and segments[b, k] == segments[b, q]:
                    allowed[b, q, prefix_len + k] = True
    return allowed


# Row 1 ends in padding, row 2 is all padding; lengths straddle the 16-token blocks.
ROWS = [[5, 17, 20, 6], [33, 1, 9], []]
ROW_LENGTH = 48


def _listed(counts, indices):
    return [sorted(indices[b, 0, q, : counts[b, 0, q]].tolist()) for b, q in _cells(counts)]


def _cells(counts):
    return [(b, q) for b in range(counts.shape[0]) for q in range(counts.shape[2])]


@pytest.mark.parametrize("prefix_len", [0, 7, 32])
def test_the_block_mask_equals_torch_s_and_the_dense_mask_equals_the_segments(prefix_len):
    segments = _segments(ROWS, ROW_LENGTH)
    layout = PackedLayout(segment_starts(segments), prefix_len, block_size=16)
    expected = _reference_allowed(segments, prefix_len)
    assert torch.equal(layout.dense(torch.float32)[:, 0] == 0, expected)
    mine = layout.block_mask
    theirs = create_block_mask(
        layout.mask_mod, 3, None, ROW_LENGTH, prefix_len + ROW_LENGTH, "cpu", BLOCK_SIZE=16
    )
    assert _listed(mine.kv_num_blocks, mine.kv_indices) == _listed(
        theirs.kv_num_blocks, theirs.kv_indices
    )
    assert _listed(mine.full_kv_num_blocks, mine.full_kv_indices) == _listed(
        theirs.full_kv_num_blocks, theirs.full_kv_indices
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_kernel_with_the_block_mask_equals_dense_attention():
    """The GPU path's semantics, checked with FlexAttention's reference (uncompiled) kernel."""
    segments = _segments(ROWS, ROW_LENGTH)
    layout = PackedLayout(segment_starts(segments), 7, block_size=16)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, ROW_LENGTH, 8, generator=generator)
    key, value = (torch.randn(3, 4, 7 + ROW_LENGTH, 8, generator=generator) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.dense(torch.float32)
    )
    actual = flex_attention(query, key, value, block_mask=layout.block_mask)
    assert (actual - expected).abs().max() <= 1e-5


def _dense_reference(query, key, value, mask, softcap):
    key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores + mask, dim=-1) @ value


@pytest.mark.parametrize(("prefix_len", "softcap"), [(7, None), (0, None), (7, 0.5)])
def test_the_cpu_kernel_gives_dense_attention_s_output_and_gradients(prefix_len, softcap):
    segments = _segments(ROWS, ROW_LENGTH)
    layout = PackedLayout(segment_starts(segments), prefix_len)
    generator = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(3, 4, ROW_LENGTH, 8, generator=generator),  # 4 query heads, 2 KV heads
        torch.randn(3, 2, prefix_len + ROW_LENGTH, 8, generator=generator),
        torch.randn(3, 2, prefix_len + ROW_LENGTH, 8, generator=generator),
    ]
    weights = torch.randn(3, 4, ROW_LENGTH, 8, generator=generator)
    if prefix_len == 0:  # padding sees nothing at all; its (unused) output is not compared
        weights = weights * (segments >= 0)[:, None, :, None]
    mine = [t.clone().requires_grad_() for t in inputs]
    reference = [t.clone().requires_grad_() for t in inputs]
    output = attention._varlen_attention(*mine, layout, None, softcap)
    expected = _dense_reference(*reference, layout.dense(torch.float32), softcap)
    (output * weights).sum().backward()
    (expected * weights).sum().backward()
    assert ((output - expected) * weights.ne(0)).abs().max() <= 1e-5
    for a, b in zip(mine, reference, strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-5
    with torch.no_grad():  # the no-grad path (evaluation) gives the same output
        assert torch.allclose(attention._varlen_attention(*inputs, layout, None, softcap), output)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_block_sparse_packed_rows_give_the_padded_loss_and_gradient(architecture, monkeypatch):
    model = build_model(architecture)
    document = torch.randint(3, VOCAB_SIZE, (30,), generator=torch.Generator().manual_seed(1))
    examples = make_examples(model, document.tolist(), 5)
    cartridge = from_token_ids(model, document[:12].tolist())
    ran = []
    kernel = attention._varlen_attention
    monkeypatch.setattr(
        attention, "_varlen_attention", lambda *args: ran.append(1) or kernel(*args)
    )
    before = model.config._attn_implementation
    results = []
    for plan, pack_length in (([[0, 1, 2], [3, 4]], 40), ([[i] for i in range(5)], None)):
        cartridge.zero_grad(set_to_none=True)
        batch = make_batch(examples, plan, 0, 12, model.dtype, pack_length, "flex")
        loss = CartridgeStudent(model, cartridge).loss_sum(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in cartridge.parameters() if p.requires_grad]))
    (packed, packed_grads), (padded, padded_grads) = results
    assert len(ran) == model.config.num_hidden_layers  # one block-sparse call per layer
    assert model.config._attn_implementation == before  # restored for other callers
    assert torch.allclose(packed, padded, atol=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_block_sparse_rows_never_attend_across_conversations():
    model, _, examples, cartridge = setting()
    rows = [[0, 1, 2], [3, 4]]
    packed = make_batch(examples, rows, 0, cartridge.num_tokens, model.dtype, 40, "flex")
    assert isinstance(packed.attention_mask, PackedLayout)  # no dense mask was built
    assert_rows_match_alone(model, cartridge, examples, rows, packed)


def test_the_attention_implementation_is_restored_after_an_error():
    model, _, examples, cartridge = setting()
    packed = make_batch(examples, [[0, 1]], 0, cartridge.num_tokens, model.dtype, 40, "flex")
    with pytest.raises(IndexError):
        forward_with_prefix(
            model,
            cartridge.as_cache(1, model.config),
            packed.input_ids + 10 * VOCAB_SIZE,  # out of the vocabulary: fails mid-forward
            packed.attention_mask,
            position_ids=packed.position_ids,
        )
    assert model.config._attn_implementation == "sdpa"


def test_training_on_block_sparse_rows_equals_training_on_dense_rows():
    model, _, examples, cartridge = setting()
    trained = {}
    for mode in ("flex", "dense"):
        config = TrainConfig(
            learning_rate=0.05,
            global_batch_size=4,
            micro_batch_size=2,
            max_steps=4,
            warmup_steps=1,
            pack_length=32,
            attention=mode,
        )
        copy = from_cartridge(cartridge)
        trained[mode] = train_cartridge(model, copy, examples, config, pad_token_id=0)[0]
    assert torch.allclose(trained["flex"].keys, trained["dense"].keys, atol=1e-5)
    assert torch.allclose(trained["flex"].values, trained["dense"].values, atol=1e-5)


class _NoFlexLlama(LlamaForCausalLM):
    """An architecture that does not support flex attention."""

    _supports_flex_attn = False


def test_a_model_without_flex_support_falls_back_to_the_dense_mask(caplog, monkeypatch):
    model, _, examples, cartridge = setting()
    other = _NoFlexLlama(model.config).eval().requires_grad_(False)
    other.load_state_dict(model.state_dict())
    with caplog.at_level(logging.INFO, logger="cartridges.attention"):
        assert choose_attention(other, "auto") == "dense"
    assert "Packed rows use a dense attention mask: _NoFlexLlama does not support flex" in (
        caplog.text
    )
    with pytest.raises(ValueError, match="cannot use block-sparse packed attention: _NoFlexLl"):
        choose_attention(other, "flex")
    assert choose_attention(model, "auto") == "flex"
    assert choose_attention(model, "dense") == "dense"
    built = []
    monkeypatch.setattr(
        "cartridges.training.make_batch",
        lambda *args: built.append(args[-1]) or make_batch(*args),
    )
    caplog.clear()
    config = TrainConfig(global_batch_size=4, micro_batch_size=4, max_steps=2, pack_length=32)
    with caplog.at_level(logging.INFO, logger="cartridges.attention"):
        train_cartridge(other, from_cartridge(cartridge), examples, config, pad_token_id=0)
    assert caplog.text.count("Packed rows use a dense attention mask") == 1  # logged once
    assert built == ["dense", "dense"]


def test_a_torch_without_flex_attention_falls_back(monkeypatch, caplog):
    model = setting()[0]
    monkeypatch.setattr(attention, "BlockMask", None)
    with caplog.at_level(logging.INFO, logger="cartridges.attention"):
        assert choose_attention(model, "auto") == "dense"
    assert "dense attention mask: this torch has no FlexAttention" in caplog.text


def test_bad_attention_settings_are_refused():
    with pytest.raises(ValueError, match="one of auto, flex, dense, got 'sparse'"):
        TrainConfig(attention="sparse")
    with pytest.raises(ValueError, match="pack_length must be >= 0 .* got -8"):
        TrainConfig(pack_length=-8)
    with pytest.raises(ValueError, match="attention must be flex or dense for packed rows"):
        packed_batch([], 8, 0, 0, torch.float32, attention="auto")
    model, _, examples, _ = setting()
    with pytest.raises(ValueError, match="attention must be one of auto, flex, dense, got 'x'"):
        choose_attention(model, "x")
    packed = make_batch(examples, [[0, 1]], 0, 0, model.dtype, 40, "flex")
    with pytest.raises(ValueError, match=r"A packed \(4D\) attention mask needs explicit posit"):
        forward_with_prefix(model, None, packed.input_ids, packed.attention_mask)
