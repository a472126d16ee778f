"""Exact attention for rows that share stored KV prefixes: one copy per prefix, any number of rows.

A cartridge (or a prefilled document) is a KV prefix that many rows attend to. A ``DynamicCache``
batch holds it once per row. Here each distinct prefix is stored once (:class:`PrefixKV`), each
row keeps only its own tokens' KV, and a row's attention is computed in two parts, as cascade
attention does:

- over its prefix: all rows of one prefix attend to the same keys in one matrix product (the rows
  folded into the query dimension), so the prefix is read once per layer and step;
- over its own tokens (its prompt and what it generated, handed over by the cache's ``update``);

and the two softmax parts are merged exactly through their log-sum-exps ``lse_1`` and ``lse_2``:
``out = out_1 * exp(lse_1 - lse) + out_2 * exp(lse_2 - lse)``, ``lse = logaddexp(lse_1, lse_2)``.

Masks are written in positions, not cache slots: a query at position ``q`` sees a key at ``k``
when ``k <= q`` and, in a sliding-window layer of window ``W``, ``q - k < W`` (transformers'
definition). A row's prefix holds positions ``0 .. p-1`` and its own tokens ``p, p+1, ...``, as
:func:`cartridges.generation.generate` places them, so the result is the model's own attention
over the concatenated cache. Attention scaling, grouped-query heads and soft-capped scores (the
``softcap`` argument, Gemma 2) are honoured. What cannot be reproduced exactly (attention dropout,
sinks, a position bias, a mask the model built itself, a non-causal layer, a layer that does not
attend to its own cache) raises :class:`UnsupportedModelError`, so that a caller can fall back to
``generate``; :func:`check_calls` also checks, after a forward, that every layer came here with
the sliding window its config gives it.

The model reaches this function through transformers' attention interface: during
:func:`attending_shared_prefix` its configs name :data:`ATTENTION_NAME`. No mask function is
registered for that name with ``AttentionMaskInterface``, so transformers builds no mask at all.
The per-forward bookkeeping (:class:`SharedPrefixBatch`) travels as the forward keyword argument
:data:`BATCH_KWARG`: transformers 5 hands extra forward kwargs down to every attention call.

This module stores no row's tokens (:mod:`cartridges.decoding.ragged_cache` does) and decides
nothing about which rows run (:mod:`cartridges.decoding.continuous`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel

from cartridges.attention import attention_implementation
from cartridges.cartridge import Cartridge
from cartridges.modeling import sliding_window, unsupported_attention_inputs

ATTENTION_NAME = "cartridges_shared_prefix"
BATCH_KWARG = "shared_prefix_batch"
INVALID_POSITION = 2**62  # the position of a padding key: after every query, so never seen


class UnsupportedModelError(ValueError):
    """A model whose attention shared-prefix decoding cannot reproduce exactly."""


@dataclass(eq=False)
class PrefixKV:
    """One stored copy of a prefix's keys and values, attended to by any number of rows.

    Attributes:
        keys: ``[layers, kv_heads, p, head_dim]`` post-RoPE keys at positions ``0 .. p-1``.
        values: ``[layers, kv_heads, p, head_dim]``.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_cartridge(
        cls, cartridge: Cartridge, dtype: torch.dtype, device: torch.device
    ) -> PrefixKV:
        """A detached copy of the cartridge's KV in the model's dtype, on its device."""
        keys = cartridge.keys.detach().to(device=device, dtype=dtype).contiguous()
        values = cartridge.values.detach().to(device=device, dtype=dtype).contiguous()
        return cls(keys, values)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(eq=False)
class SharedPrefixBatch:
    """Where one forward's queries and keys sit, and which prefix each row attends to.

    Attributes:
        query_positions: ``[B, T]`` position of each query (padding: its row's first new one).
        key_positions: ``[B, L]`` position of each own key the cache hands attention
            (:data:`INVALID_POSITION` for padding).
        groups: each distinct prefix with the rows that attend to it (``None``: all rows).
        calls: filled during the forward: each layer that attended, and its sliding window.
    """

    query_positions: torch.Tensor
    key_positions: torch.Tensor
    groups: list[tuple[PrefixKV, torch.Tensor | None]]
    calls: dict[int, int | None] = field(default_factory=dict)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, Hq, T, D]``, own ``key/value [B, Hkv, L, D]``.

    Returns the output as ``[B, T, Hq, D]`` and no attention weights.
    """
    batch = kwargs.get(BATCH_KWARG)
    layer = _check_exact(module, key, attention_mask, dropout, batch, kwargs)
    batch.calls[layer] = sliding_window
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch_size, heads, length, _ = query.shape
    out, lse = _attend_own(query, key, value, batch, scale, softcap, sliding_window)
    for prefix, rows in batch.groups:
        queries = query if rows is None else query[rows]
        positions = batch.query_positions if rows is None else batch.query_positions[rows]
        part = _attend_prefix(queries, prefix, layer, positions, scale, softcap, sliding_window)
        if part is None:  # every prefix key lies outside the window of these queries
            continue
        if rows is None:
            out, lse = _merge(out, lse, *part)
        else:
            out[rows], lse[rows] = _merge(out[rows], lse[rows], *part)
    out = out.reshape(batch_size, heads, length, -1).to(query.dtype)  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


def _check_exact(module, key, attention_mask, dropout, batch, kwargs) -> int:
    """The layer's index, once sure this call can be computed exactly here."""
    if not isinstance(batch, SharedPrefixBatch):
        raise RuntimeError(
            f"{ATTENTION_NAME} attention needs the forward keyword argument {BATCH_KWARG}."
        )
    name = type(module).__name__
    layer = getattr(module, "layer_idx", None)
    problems = []
    if layer is None:
        problems.append("the attention module has no layer_idx")
    if attention_mask is not None:
        problems.append(f"the model built its own attention mask ({type(attention_mask).__name__})")
    if dropout:
        problems.append(f"attention dropout is {dropout}")
    if getattr(module, "is_causal", True) is False:
        problems.append("the layer is not causal")
    problems += [f"it passes {what}" for what in unsupported_attention_inputs(kwargs)]
    if key.shape[2] != batch.key_positions.shape[1]:
        problems.append(
            f"its keys ({key.shape[2]} positions) are not the {batch.key_positions.shape[1]} "
            "its cache handed it (KV shared across layers?)"
        )
    if problems:
        raise UnsupportedModelError(
            f"Shared-prefix attention cannot reproduce {name} (layer {layer}) exactly: "
            f"{'; '.join(problems)}. Decode this model with cartridges.generation.generate."
        )
    return layer


def _scores(query, key, scale: float, softcap: float | None) -> torch.Tensor:
    """Float32 ``query @ key^T``, scaled and soft-capped as the model's eager attention does."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _softmax_part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted values and the log-sum-exp of masked ``scores`` (``-inf`` when empty)."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = lse.masked_fill(lse.isneginf(), 0.0)  # an empty row gets zero weights, not NaN
    probabilities = torch.exp(scores - safe[..., None])
    return torch.matmul(probabilities.to(values.dtype), values).float(), lse


def _attend_own(query, key, value, batch: SharedPrefixBatch, scale, softcap, window):
    """Each row's attention over its own tokens: out ``[B, Hkv, G*T, D]``, lse ``[B, Hkv, G*T]``.

    A query always sees its own key, so no row is empty.
    """
    batch_size, heads, length, dim = query.shape
    kv_heads, keys_length = key.shape[1], key.shape[2]
    grouped = query.reshape(batch_size, kv_heads, heads // kv_heads * length, dim)
    scores = _scores(grouped, key, scale, softcap)  # [B, Hkv, G*T, L]
    queries = batch.query_positions[:, :, None]  # [B, T, 1]
    keys = batch.key_positions[:, None, :]  # [B, 1, L]
    allowed = keys <= queries
    if window is not None:
        allowed &= queries - keys < window
    shape = (batch_size, kv_heads, heads // kv_heads, length, keys_length)
    scores = scores.view(shape).masked_fill(~allowed[:, None, None], float("-inf"))
    return _softmax_part(scores.view(batch_size, kv_heads, -1, keys_length), value)


def _attend_prefix(query, prefix: PrefixKV, layer: int, positions, scale, softcap, window):
    """Attention of rows ``query [b, Hq, T, D]`` over one stored prefix, or ``None`` if unseen.

    The rows share the prefix's keys, so they are folded into the query dimension: one matrix
    product per layer reads the prefix once for all of them. Returns out ``[b, Hkv, G*T, D]``
    and lse ``[b, Hkv, G*T]``.
    """
    keys, values = prefix.keys[layer], prefix.values[layer]  # [Hkv, p, D]
    start = 0
    if window is not None:  # keys before every query's window need not be read
        start = max(0, int(positions.min()) - window + 1)
        if start >= keys.shape[1]:
            return None
        keys, values = keys[:, start:], values[:, start:]
    rows, heads, length, dim = query.shape
    kv_heads, prefix_length = keys.shape[0], keys.shape[1]
    folded = query.reshape(rows, kv_heads, heads // kv_heads * length, dim).transpose(0, 1)
    scores = _scores(folded.reshape(kv_heads, -1, dim), keys, scale, softcap)  # [Hkv, bGT, p]
    if window is not None:
        key_positions = torch.arange(start, start + prefix_length, device=positions.device)
        allowed = positions[:, :, None] - key_positions < window  # [b, T, p]
        shape = (kv_heads, rows, heads // kv_heads, length, prefix_length)
        scores = scores.view(shape).masked_fill(~allowed[None, :, None], float("-inf"))
        scores = scores.view(kv_heads, -1, prefix_length)
    out, lse = _softmax_part(scores, values)  # [Hkv, bGT, D], [Hkv, bGT]
    out = out.view(kv_heads, rows, -1, out.shape[-1]).transpose(0, 1)
    return out, lse.view(kv_heads, rows, -1).transpose(0, 1)


def _merge(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax parts over disjoint keys merged into the softmax over all of them."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse


def attending_shared_prefix(model: PreTrainedModel) -> AbstractContextManager[None]:
    """Within the block ``model`` attends through :func:`shared_prefix_attention`.

    Restored on exit (:func:`cartridges.attention.attention_implementation`); not thread-safe.
    """
    return attention_implementation(model, ATTENTION_NAME)


def expected_windows(config, num_layers: int) -> dict[int, int | None]:
    """The sliding window each layer should attend with (``None``: full attention)."""
    window = sliding_window(config)
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    if window is None:
        return dict.fromkeys(range(num_layers))
    if layer_types is None:
        return dict.fromkeys(range(num_layers), window)
    return {i: window if layer_types[i] == "sliding_attention" else None for i in range(num_layers)}


def check_calls(model: PreTrainedModel, batch: SharedPrefixBatch, num_layers: int) -> None:
    """Refuse a model whose last forward did not attend here, layer by layer, as it should.

    A layer missing from ``batch.calls`` attends some other way (it would ignore the prefix);
    a sliding window that differs from the config's means the model applies it elsewhere.
    """
    expected = expected_windows(model.config, num_layers)
    if batch.calls != expected:
        raise UnsupportedModelError(
            f"Model '{model.name_or_path}' does not attend through shared-prefix attention as "
            f"its config says: layer -> sliding window seen {batch.calls}, expected {expected}. "
            "Decode this model with cartridges.generation.generate."
        )
