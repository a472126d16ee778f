"""The cartridge: a small trainable KV cache that stands in for a corpus.

Per layer it holds keys and values of shape ``(kv_heads, p, head_dim)``, post-RoPE, exactly as
a KV cache holds them after a prefill, so that injecting it is just handing the model a filled
cache. The first ``num_frozen_tokens`` positions (the attention sink) are a buffer, the rest a
parameter: an optimiser can only move the trainable part.

Why not PEFT's CARTRIDGE tuner: its ``PeftModel.generate`` drops the prefix on transformers 5,
it refuses packed 4D attention masks (which distillation training relies on) and it stores one
flat ``[p, layers * 2 * heads * head_dim]`` matrix per adapter. This module keeps the KV in its
natural shape and is plain ``torch``; :mod:`cartridges.checkpoint` converts to and from PEFT's
adapter format so that users can still load our cartridges with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from cartridges.modeling import KVLayout, kv_layout, model_fingerprint


class CartridgeMismatchError(ValueError):
    """A cartridge used with a model whose KV cache it was not made for."""


HELD_OUT_CONVERSATIONS = "held_out_conversations"  # the key of ``extra`` that records them


@dataclass
class CartridgeInfo:
    """Provenance of a cartridge, stored next to its tensors."""

    model_name: str = ""
    model_fingerprint: str = ""
    initializer: str = ""
    source_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def held_out_conversations(self) -> list[str] | None:
        """The conversations its training held out (``None``: not recorded, an older run)."""
        return self.extra.get(HELD_OUT_CONVERSATIONS)


class Cartridge(nn.Module):
    """A KV prefix of ``p`` tokens per layer; the first ``num_frozen_tokens`` are frozen.

    Args:
        keys: ``(layers, kv_heads, p, head_dim)`` post-RoPE keys.
        values: ``(layers, kv_heads, p, head_dim)`` values.
        num_frozen_tokens: leading positions kept fixed. The paper freezes the first token (the
            attention sink): training it makes general ability collapse.
        info: provenance (model, initialiser, source corpus hash).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_frozen_tokens: int = 1,
        info: CartridgeInfo | None = None,
    ) -> None:
        super().__init__()
        if keys.ndim != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must both have shape (layers, kv_heads, p, head_dim); got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}."
            )
        num_tokens = keys.shape[2]
        if not 0 <= num_frozen_tokens <= num_tokens:
            raise ValueError(
                f"num_frozen_tokens must lie in [0, p={num_tokens}], got {num_frozen_tokens}."
            )
        frozen, trainable = num_frozen_tokens, num_tokens - num_frozen_tokens
        self.register_buffer("frozen_keys", keys[:, :, :frozen].detach().clone())
        self.register_buffer("frozen_values", values[:, :, :frozen].detach().clone())
        self.trainable_keys = nn.Parameter(keys[:, :, frozen:].detach().clone())
        self.trainable_values = nn.Parameter(values[:, :, frozen:].detach().clone())
        self.info = info or CartridgeInfo()
        if trainable == 0:
            self.trainable_keys.requires_grad_(False)
            self.trainable_values.requires_grad_(False)

    # ------------------------------------------------------------------ shapes
    @property
    def keys(self) -> torch.Tensor:
        """All keys, frozen then trainable: ``(layers, kv_heads, p, head_dim)``."""
        return torch.cat([self.frozen_keys, self.trainable_keys], dim=2)

    @property
    def values(self) -> torch.Tensor:
        """All values, frozen then trainable: ``(layers, kv_heads, p, head_dim)``."""
        return torch.cat([self.frozen_values, self.trainable_values], dim=2)

    @property
    def num_tokens(self) -> int:
        return self.frozen_keys.shape[2] + self.trainable_keys.shape[2]

    @property
    def num_frozen_tokens(self) -> int:
        return self.frozen_keys.shape[2]

    @property
    def layout(self) -> KVLayout:
        num_layers, num_kv_heads, _, head_dim = self.frozen_keys.shape
        return KVLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.trainable_keys.dtype

    @property
    def kv_bytes(self) -> int:
        """Bytes the cartridge occupies as a KV cache (keys and values, all layers)."""
        return self.num_tokens * self.layout.bytes_per_token(self.dtype)

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"p={self.num_tokens}, frozen={self.num_frozen_tokens}, layers={layout.num_layers}, "
            f"kv_heads={layout.num_kv_heads}, head_dim={layout.head_dim}, dtype={self.dtype}"
        )

    # --------------------------------------------------------------- injection
    def as_cache(self, batch_size: int = 1, config=None) -> DynamicCache:
        """A fresh ``DynamicCache`` holding the cartridge for ``batch_size`` sequences.

        A forward pass extends its cache in place, so build a new one per forward. Gradients
        flow from the model's loss back into the trainable keys and values.

        Args:
            batch_size: how many sequences share the prefix (a broadcast view, no copy).
            config: the model config, so that sliding-window layers get their own cache type.
        """
        return prefix_cache([self], batch_size, config)

    def check_layout(self, model: PreTrainedModel) -> None:
        """Refuse a model whose KV cache has another shape (layers, kv heads, head dim).

        Such a cartridge would otherwise fail deep inside attention with a bare shape error.
        Sliding-window layers need no check: the prefix is injected whole and the model masks
        positions outside each layer's window exactly as it does for a document in context.
        """
        theirs, mine = kv_layout(model), self.layout
        if _shape(mine) != _shape(theirs):
            raise CartridgeMismatchError(
                f"Cartridge KV layout ({_describe(mine)}, made for model "
                f"'{self.info.model_name}') does not match model '{model.name_or_path}' "
                f"({_describe(theirs)})."
            )

    def check_compatible(self, model: PreTrainedModel) -> None:
        """Refuse a model whose KV layout (:meth:`check_layout`) or fingerprint differs.

        Equal layouts but different fingerprints mean other weights: the cartridge would run
        and silently answer wrong.
        """
        self.check_layout(model)
        fingerprint = model_fingerprint(model)
        if self.info.model_fingerprint and self.info.model_fingerprint != fingerprint:
            raise CartridgeMismatchError(
                f"Cartridge was trained for model '{self.info.model_name}' (fingerprint "
                f"{self.info.model_fingerprint}) but the loaded model '{model.name_or_path}' has "
                f"fingerprint {fingerprint}: same shapes, different weights or config."
            )

    @classmethod
    def empty_like(cls, other: Cartridge) -> Cartridge:
        """A zero-length cartridge with ``other``'s layout (the identity of composition)."""
        shape = (*other.frozen_keys.shape[:2], 0, other.frozen_keys.shape[3])
        empty = torch.zeros(shape, dtype=other.dtype, device=other.frozen_keys.device)
        return cls(empty, empty, num_frozen_tokens=0, info=other.info)


def _shape(layout: KVLayout) -> tuple[int, int, int]:
    return layout.num_layers, layout.num_kv_heads, layout.head_dim


def _describe(layout: KVLayout) -> str:
    return f"layers={layout.num_layers}, kv_heads={layout.num_kv_heads}, head_dim={layout.head_dim}"


def prefix_cache(parts: Sequence[Cartridge], batch_size: int = 1, config=None) -> DynamicCache:
    """A fresh ``DynamicCache`` holding ``parts`` one after the other, for ``batch_size``
    sequences (broadcast views, no copy), with gradients into every trainable part (unlike
    :func:`compose`, which makes a new, detached cartridge)."""
    keys = torch.cat([part.keys for part in parts], dim=2) if len(parts) > 1 else parts[0].keys
    values = (
        torch.cat([part.values for part in parts], dim=2) if len(parts) > 1 else parts[0].values
    )
    layers = [
        (
            keys[i].unsqueeze(0).expand(batch_size, -1, -1, -1),
            values[i].unsqueeze(0).expand(batch_size, -1, -1, -1),
        )
        for i in range(keys.shape[0])
    ]
    return DynamicCache(layers, config=config)


def compose(cartridges: Sequence[Cartridge]) -> Cartridge:
    """Concatenate cartridges along the sequence axis, in the given order, with no retraining.

    The result keeps the first cartridge's frozen positions frozen and treats everything after
    them as trainable, so it can be fine-tuned further as one cartridge.
    """
    if not cartridges:
        raise ValueError("compose() needs at least one cartridge.")
    first = cartridges[0]
    for other in cartridges[1:]:
        if other.layout != first.layout:
            raise CartridgeMismatchError(
                "Cannot compose cartridges with different KV layouts: "
                f"{first.layout} vs {other.layout}."
            )
        if (
            other.info.model_fingerprint
            and first.info.model_fingerprint
            and (other.info.model_fingerprint != first.info.model_fingerprint)
        ):
            raise CartridgeMismatchError(
                "Cannot compose cartridges made for different models: "
                f"'{first.info.model_name}' ({first.info.model_fingerprint}) and "
                f"'{other.info.model_name}' ({other.info.model_fingerprint})."
            )
    keys = torch.cat([c.keys.detach() for c in cartridges], dim=2)
    values = torch.cat([c.values.detach() for c in cartridges], dim=2)
    info = CartridgeInfo(
        model_name=first.info.model_name,
        model_fingerprint=first.info.model_fingerprint,
        initializer="compose",
        extra={"components": [c.num_tokens for c in cartridges]},
    )
    return Cartridge(keys, values, num_frozen_tokens=first.num_frozen_tokens, info=info)
