"""Block-sparse attention for packed rows: a shared prefix, then causal attention per conversation.

A packed row holds several conversations after the cartridge's ``p`` KV positions. Token ``q``
may attend to every prefix position and, causally, to the earlier tokens of its own
conversation. A dense ``[B, 1, T, p + T]`` mask says so but makes attention quadratic in the row
length; :class:`PackedLayout` says it in ``O(B x T)`` (where each token's conversation starts)
and becomes a FlexAttention ``BlockMask`` whose empty blocks are never computed.

The model runs it through transformers' attention interface: for one forward pass the model's
configs name :data:`ATTENTION_NAME`, a function registered here that runs the compiled
FlexAttention kernel where it has a backward pass (CUDA and other accelerators; rows share one
length, so it compiles once), and on the CPU (FlexAttention has no CPU backward) attends one
conversation at a time with SDPA (varlen). The implementation name is restored afterwards, so
other users of the same model object are unaffected. Models that cannot dispatch this way fall
back to the dense mask (``choose_attention``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import AttentionInterface, PreTrainedModel

from cartridges.modeling import unsupported_attention_inputs

try:
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # a torch without FlexAttention: packed rows use the dense mask
    BlockMask = None

logger = logging.getLogger(__name__)

ATTENTION_NAME = "cartridges_block_sparse"
ATTENTION_MODES = ("auto", "flex", "dense")
_FLEX_BACKWARD_DEVICES = ("cuda", "xpu", "hpu")  # FlexAttention has no backward on cpu and mps


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` index where each token's conversation starts; ``q + 1`` for padding.

    Args:
        segments: ``[B, T]`` conversation index of each token in its row, ``-1`` for padding;
            each conversation's tokens are contiguous.
    """
    batch, length = segments.shape
    index = torch.arange(length, device=segments.device).expand(batch, length)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(first, index, torch.zeros_like(index)).cummax(dim=-1).values
    return torch.where(segments >= 0, starts, index + 1)  # padding: an empty interval


@dataclass(frozen=True)
class PackedLayout:
    """Packed rows' attention pattern: all ``prefix_len`` prefix slots, then ``[start, q]``.

    Query ``q`` (a row index) may attend to key slot ``j`` (prefix slots first) when
    ``j < prefix_len`` or ``starts[q] <= j - prefix_len <= q``. Padding queries see only the
    prefix, so that no softmax row is empty.
    """

    starts: torch.Tensor  # [B, T]
    prefix_len: int
    block_size: int = 128  # FlexAttention's default block (GPU kernels want multiples of 128)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, length = self.starts.shape
        return batch, 1, length, self.prefix_len + length

    def to(self, device: torch.device | str) -> PackedLayout:
        return PackedLayout(self.starts.to(device), self.prefix_len, self.block_size)

    @property
    def mask_mod(self):
        """FlexAttention's ``mask_mod(b, h, q, k)``: whether query ``q`` may see key slot ``k``.

        A closure over tensors and ints only, so a compiled kernel treats each batch's starts
        as an input rather than recompiling.
        """
        starts, prefix_len, last = self.starts, self.prefix_len, self.starts.shape[1] - 1

        def allowed(b, _h, q, k):
            row_key = k - prefix_len
            start = starts[b, q.clamp(0, last)]
            return (k < prefix_len) | ((row_key >= start) & (row_key <= q))

        return allowed

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[B, 1, T, p + T]`` additive mask (0 allowed, dtype's minimum elsewhere)."""
        batch, _, length, keys = self.shape
        device = self.starts.device
        allowed = self.mask_mod(
            torch.arange(batch, device=device)[:, None, None],
            None,
            torch.arange(length, device=device)[None, :, None],
            torch.arange(keys, device=device)[None, None, :],
        )
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

    @cached_property
    def block_mask(self) -> BlockMask:
        """The FlexAttention ``BlockMask``, computed per block from the starts (no dense mask).

        A block of queries ``[q0, q1)`` and key slots ``[k0, k1)`` is empty when no query's
        interval meets the block's row keys and it holds no prefix slot, full when every query
        sees every key, and partial otherwise (``mask_mod`` then decides per element).
        """
        if BlockMask is None:
            raise RuntimeError("This torch has no FlexAttention; use attention: dense.")
        batch, _, length, keys = self.shape
        size, p, device = self.block_size, self.prefix_len, self.starts.device
        q0 = torch.arange(0, length, size, device=device)  # [Q]
        q1 = (q0 + size).clamp(max=length)
        k0 = torch.arange(0, keys, size, device=device)  # [K]
        k1 = (k0 + size).clamp(max=keys)
        r0, r1 = (k0 - p).clamp(min=0), k1 - p  # row keys of each key block: [r0, r1)
        has_row = (r1 > r0)[None, None, :]
        has_prefix = (k0 < p)[None, None, :]
        first = torch.maximum(q0[:, None], r0[None, :]).clamp(max=length - 1)  # [Q, K]
        # starts is non-decreasing along a row, so the earliest start among queries >= r0
        # is that of the first such query; if that one is padding, so are all after it.
        earliest = self.starts[:, first]  # [B, Q, K]
        meets = ((q1 - 1)[:, None] >= r0[None, :]) & (earliest < r1[None, :]) & (earliest <= first)
        latest = self.starts[:, q1 - 1][:, :, None]  # [B, Q, 1]: the largest start
        covers = (latest <= r0[None, None, :]) & (q0[:, None] >= (r1 - 1)[None, :])
        full = (~has_row | covers) & (has_prefix | has_row)
        partial = (has_prefix | (has_row & meets)) & ~full
        mask = BlockMask.from_kv_blocks(
            *_indices(partial),
            *_indices(full),
            BLOCK_SIZE=size,
            mask_mod=self.mask_mod,
            seq_lengths=(length, keys),
        )
        mask.packed_layout = self  # models pass it through untouched; the CPU kernel reads it
        return mask


def _indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[B, 1, Q]`` and indices ``[B, 1, Q, K]`` (listed blocks first) of a block map."""
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    return counts[:, None].contiguous(), order[:, None].to(torch.int32).contiguous()


# --------------------------------------------------------------------------- the CPU kernel
@dataclass(frozen=True)
class _Segment:
    """Row ``row``'s queries ``[start, end)``: one conversation, or the row's padding tail."""

    row: int
    start: int
    end: int
    padding: bool
    mask: torch.Tensor | None  # [n, p + n] bottom-right causal; None: padding sees the prefix


def _segments(layout: PackedLayout) -> list[_Segment]:
    """Each row's conversations and padding tail, from the starts (computed once per layout).

    Without a prefix, padding sees nothing: it is left out and its output stays zero.
    """
    starts = layout.starts.cpu()
    length = starts.shape[1]
    index = torch.arange(length)
    masks: dict[int, torch.Tensor] = {}  # one per conversation length, shared by all layers
    segments = []
    for row in range(starts.shape[0]):
        padding = starts[row] > index
        first = ((starts[row] == index) & ~padding).nonzero().flatten().tolist()
        tail = int(padding.nonzero()[0]) if padding.any() else length
        bounds = [*first, tail]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end - start not in masks:
                masks[end - start] = _causal_after_prefix(
                    end - start, layout.prefix_len, layout.starts.device
                )
            segments.append(_Segment(row, start, end, False, masks[end - start]))
        if tail < length and layout.prefix_len:
            segments.append(_Segment(row, tail, length, True, None))
    return segments


def _segment_inputs(query, key, value, prefix_len: int, segment: _Segment):
    """The segment's queries and the keys/values it sees: the prefix, then its own tokens."""
    row, rows = slice(segment.row, segment.row + 1), slice(segment.start, segment.end)
    if segment.padding:
        return query[row, :, rows], key[row, :, :prefix_len], value[row, :, :prefix_len]
    own = slice(prefix_len + segment.start, prefix_len + segment.end)
    return (
        query[row, :, rows],
        torch.cat([key[row, :, :prefix_len], key[row, :, own]], dim=2),
        torch.cat([value[row, :, :prefix_len], value[row, :, own]], dim=2),
    )


def _causal_after_prefix(length: int, prefix_len: int, device) -> torch.Tensor:
    """Bottom-right causal ``[n, p + n]`` (SDPA's ``is_causal`` aligns top-left)."""
    own = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    return torch.cat([own.new_ones((length, prefix_len)), own], dim=1)


class _SegmentAttention(torch.autograd.Function):
    """Attention one packed conversation at a time (varlen), gradients added into slices.

    Plain autograd over slices would give every segment a full-size zero key gradient, costing
    more than the attention saved; here each input's gradient is allocated once, and each
    segment's own small graph (kept from the forward) is differentiated in turn.
    """

    @staticmethod
    def forward(ctx, query, key, value, layout, scaling, softcap):
        p = layout.prefix_len
        output = query.new_zeros(query.shape)
        ctx.graphs, ctx.prefix_len = [], p
        for segment in _segments_of(layout):
            with torch.enable_grad():
                inputs = [
                    t.detach().requires_grad_()
                    for t in _segment_inputs(query, key, value, p, segment)
                ]
                out = _attend(*inputs, segment.mask, scaling, softcap)
            output[segment.row, :, segment.start : segment.end] = out[0].detach()
            ctx.graphs.append((segment, inputs, out))
        ctx.shapes = (query.shape, key.shape)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        p = ctx.prefix_len
        query_shape, key_shape = ctx.shapes
        grad_q = grad_output.new_zeros(query_shape)
        grad_k, grad_v = grad_output.new_zeros(key_shape), grad_output.new_zeros(key_shape)
        for segment, inputs, out in ctx.graphs:
            rows = slice(segment.start, segment.end)
            grads = torch.autograd.grad(
                out, inputs, grad_output[segment.row : segment.row + 1, :, rows]
            )
            grad_q[segment.row, :, rows] = grads[0][0]
            for total, grad in ((grad_k, grads[1][0]), (grad_v, grads[2][0])):
                total[segment.row, :, :p] += grad[:, :p]
                if not segment.padding:
                    total[segment.row, :, p + segment.start : p + segment.end] = grad[:, p:]
        ctx.graphs = None
        return grad_q, grad_k, grad_v, None, None, None


def _segments_of(layout: PackedLayout) -> list[_Segment]:
    if "_segments" not in layout.__dict__:
        layout.__dict__["_segments"] = _segments(layout)  # cached on the frozen layout
    return layout.__dict__["_segments"]


def _varlen_attention(query, key, value, layout: PackedLayout, scaling, softcap):
    """Exact attention over each conversation's prefix and own tokens only (CPU; differentiable).

    Cost follows ``sum n x (p + n)`` over conversations rather than ``T x (p + T)`` per row.
    """
    if not (query.requires_grad or key.requires_grad or value.requires_grad):
        p, output = layout.prefix_len, query.new_zeros(query.shape)
        for segment in _segments_of(layout):
            inputs = _segment_inputs(query, key, value, p, segment)
            output[segment.row, :, segment.start : segment.end] = _attend(
                *inputs, segment.mask, scaling, softcap
            )[0]
        return output
    return _SegmentAttention.apply(query, key, value, layout, scaling, softcap)


def _attend(query, key, value, allowed, scaling, softcap):
    """SDPA under a boolean mask (``None``: all allowed); soft-capped scores need it spelt out."""
    groups = query.shape[1] // key.shape[1]
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=groups > 1
        )
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ value


def block_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for a :attr:`PackedLayout.block_mask`: ``[B, T, H, D]``."""
    unsupported = unsupported_attention_inputs(kwargs) + ([f"dropout {dropout}"] if dropout else [])
    if unsupported:
        raise ValueError(
            f"Block-sparse packed attention cannot compute {type(module).__name__}'s attention: "
            f"it passes {', '.join(unsupported)}. Set train.attention: dense."
        )
    layout = getattr(attention_mask, "packed_layout", None)
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"{ATTENTION_NAME} attention needs a PackedLayout's block mask.")
    if key.dtype != query.dtype:  # a float32 prefix under bfloat16 autocast, as SDPA casts it
        key, value = key.to(query.dtype), value.to(query.dtype)
    if query.device.type in _FLEX_BACKWARD_DEVICES:
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, softcap=softcap
        )
    output = _varlen_attention(query, key, value, layout, scaling, softcap)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, block_sparse_attention)


# --------------------------------------------------------------------------- model dispatch
def _configs(model: PreTrainedModel) -> list:
    """Every config whose ``_attn_implementation`` an attention layer of ``model`` may read."""
    found, pending = {}, [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) not in found:
            found[id(config)] = config
            pending += [getattr(config, name) for name in getattr(config, "sub_configs", {})]
    return [config for config in found.values() if config is not None]


def block_sparse_unsupported(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot run packed rows block-sparse (``None`` when it can)."""
    if BlockMask is None:
        return "this torch has no FlexAttention"
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if not module._supports_flex_attn:
                return f"{type(module).__name__} does not support flex attention"
            if not module._can_set_attn_implementation():
                return f"{type(module).__name__} cannot switch its attention implementation"
    return None


def choose_attention(model: PreTrainedModel, requested: str) -> str:
    """``flex`` (block-sparse) or ``dense`` for packed rows; ``auto`` logs a fallback once."""
    if requested not in ATTENTION_MODES:
        modes = ", ".join(ATTENTION_MODES)
        raise ValueError(f"attention must be one of {modes}, got {requested!r}.")
    if requested == "dense":
        return "dense"
    reason = block_sparse_unsupported(model)
    if reason is None:
        return "flex"
    if requested == "flex":
        raise ValueError(
            f"Model '{model.name_or_path}' cannot use block-sparse packed attention: {reason}. "
            "Set train.attention: dense (or auto)."
        )
    logger.info("Packed rows use a dense attention mask: %s.", reason)
    return "dense"


def describe(attention: str, model: PreTrainedModel) -> str:
    """What a packed row's attention mode runs on ``model``'s device, for a log line."""
    if attention == "dense":
        return "a dense [rows, 1, tokens, p + tokens] mask (quadratic in the row length)"
    if model.device.type in _FLEX_BACKWARD_DEVICES:
        return "a compiled FlexAttention kernel over a block-sparse mask"
    return (
        f"exact per-conversation SDPA on {model.device.type} (FlexAttention has no backward "
        "there), skipping the masked blocks"
    )


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Within the block every attention layer of ``model`` dispatches to implementation ``name``.

    The switch is for one call: each config's implementation name is restored on exit (also
    after an error), so other callers of the same model object see it unchanged. Not
    thread-safe: a concurrent forward of the same model object inside the block would see the
    switch.
    """
    configs = _configs(model)
    saved = [config._attn_implementation_internal for config in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = name
        yield
    finally:
        for config, implementation in zip(configs, saved, strict=True):
            config._attn_implementation_internal = implementation


def block_sparse(model: PreTrainedModel) -> AbstractContextManager[None]:
    """Within the block the model attends through :func:`block_sparse_attention`."""
    return attention_implementation(model, ATTENTION_NAME)
