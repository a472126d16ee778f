"""Ways to initialise a cartridge before training.

The paper's ablation (LongHealth accuracy): random vectors 29.9%, the KV of random tokens
51.3%, the KV of the first p tokens of the corpus 55.3%. The last is the default.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge, CartridgeInfo
from cartridges.modeling import kv_layout, model_fingerprint

INITIALIZERS = ("text", "random_tokens", "random_vectors", "cartridge")


@torch.no_grad()
def kv_of_tokens(model: PreTrainedModel, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``token_ids`` and return their KV as ``(layers, kv_heads, T, head_dim)`` tensors."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=model.device)
    # A config-less cache keeps every position, also in sliding-window layers (which would
    # otherwise drop all but the last window's worth).
    cache = model(input_ids=ids, cache=DynamicCache(), use_cache=True).cache
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


def _info(model: PreTrainedModel, initializer: str, source_sha256: str = "") -> CartridgeInfo:
    return CartridgeInfo(
        model_name=str(model.name_or_path),
        model_fingerprint=model_fingerprint(model),
        initializer=initializer,
        source_sha256=source_sha256,
    )


def from_token_ids(
    model: PreTrainedModel,
    token_ids: list[int],
    num_frozen_tokens: int = 1,
    initializer: str = "token_ids",
    source_sha256: str = "",
) -> Cartridge:
    """A cartridge holding exactly the KV of ``token_ids`` (p = their count)."""
    keys, values = kv_of_tokens(model, token_ids)
    info = _info(model, initializer, source_sha256)
    return Cartridge(keys, values, num_frozen_tokens=num_frozen_tokens, info=info)


def from_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    num_tokens: int | None = None,
    num_frozen_tokens: int = 1,
) -> Cartridge:
    """The KV of the first ``num_tokens`` tokens of ``text`` (all of it when ``None``).

    The text is tokenised with the tokenizer's special tokens, so the frozen first position is the
    beginning-of-sequence token where the model has one: the attention sink it was trained with.
    """
    token_ids = tokenizer(text)["input_ids"]
    if num_tokens is None:
        num_tokens = len(token_ids)
    if num_tokens > len(token_ids):
        raise ValueError(
            f"Cannot initialise a cartridge of p={num_tokens} tokens from a text of only "
            f"{len(token_ids)} tokens: lower num_cartridge_tokens, or initialise from "
            "random_tokens instead."
        )
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    return from_token_ids(model, token_ids[:num_tokens], num_frozen_tokens, "text", sha256)


def from_random_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    num_frozen_tokens: int = 1,
    generator: torch.Generator | None = None,
) -> Cartridge:
    """The KV of random vocabulary tokens, after the beginning-of-sequence token if any."""
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    picks = torch.randint(len(vocabulary), (num_tokens,), generator=generator)
    token_ids = vocabulary[picks].tolist()
    if tokenizer.bos_token_id is not None and num_tokens > 0:
        token_ids[0] = tokenizer.bos_token_id
    return from_token_ids(model, token_ids, num_frozen_tokens, "random_tokens")


def from_random_vectors(
    model: PreTrainedModel,
    num_tokens: int,
    num_frozen_tokens: int = 1,
    generator: torch.Generator | None = None,
) -> Cartridge:
    """Gaussian keys and values, scaled per layer to the spread of the model's own KV."""
    layout = kv_layout(model)
    reference_keys, reference_values = kv_of_tokens(
        model, list(range(min(16, model.config.vocab_size)))
    )
    shape = (layout.num_layers, layout.num_kv_heads, num_tokens, layout.head_dim)
    noise = torch.randn((2, *shape), generator=generator).to(model.device, model.dtype)
    keys = noise[0] * reference_keys.std(dim=(1, 2, 3), keepdim=True)
    values = noise[1] * reference_values.std(dim=(1, 2, 3), keepdim=True)
    return Cartridge(keys, values, num_frozen_tokens, info=_info(model, "random_vectors"))


def from_cartridge(source: Cartridge, num_frozen_tokens: int | None = None) -> Cartridge:
    """A trainable copy of an existing cartridge (to continue training or fine-tune it)."""
    frozen = source.num_frozen_tokens if num_frozen_tokens is None else num_frozen_tokens
    info = CartridgeInfo(
        model_name=source.info.model_name,
        model_fingerprint=source.info.model_fingerprint,
        initializer="cartridge",
        source_sha256=source.info.source_sha256,
    )
    return Cartridge(source.keys.detach(), source.values.detach(), frozen, info=info)
