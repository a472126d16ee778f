"""Run a model with a KV prefix (a cartridge, or a prefilled document) through the cache API.

The prefix is handed to the model as a filled ``DynamicCache``; the tokens that follow take
positions ``p, p+1, ...`` and may attend to every prefix position. Padding (left or right) is
handled with an explicit attention mask and explicit position ids, because models differ in
whether they derive positions from the mask, and a prefix must shift them either way.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import Cache, PreTrainedModel

from cartridges.attention import PackedLayout, block_sparse
from cartridges.modeling import sliding_window


def prefixed_positions(prefix_len: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for tokens after a prefix: ``p`` for the first real token of each row.

    Args:
        prefix_len: number of cached prefix tokens ``p``.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding (left or right).
    """
    positions = prefix_len + attention_mask.long().cumsum(-1) - 1  # [B, T]
    return positions.clamp_min(prefix_len)


def prefixed_mask(prefix_len: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``(B, p + T)`` attention mask: every token may attend to the whole prefix."""
    ones = attention_mask.new_ones((attention_mask.shape[0], prefix_len))
    return torch.cat([ones, attention_mask], dim=-1)


def has_left_padding(attention_mask: torch.Tensor) -> bool:
    """True when some non-empty row starts with padding."""
    return bool(((attention_mask[:, 0] == 0) & (attention_mask.sum(dim=-1) > 0)).any())


def forward_with_prefix(
    model: PreTrainedModel,
    cache: Cache | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """One forward pass of ``input_ids`` after the prefix held in ``cache`` (``None``: no prefix).

    The cache is extended in place (or created, when ``None`` and ``use_cache``); build a fresh
    one per call when it must be reused. Training passes ``use_cache=False`` to keep no KV.
    Packed rows' masks, a 4D additive ``[B, 1, T, p + T]`` tensor or a block-sparse
    :class:`~cartridges.attention.PackedLayout`, are passed through as they are, with the
    explicit ``position_ids`` they need; for a layout the model attends block-sparse during
    this call only.
    """
    if isinstance(attention_mask, PackedLayout) or (
        attention_mask is not None and attention_mask.ndim == 4
    ):
        if position_ids is None:
            raise ValueError("A packed (4D) attention mask needs explicit position_ids.")
        sparse = isinstance(attention_mask, PackedLayout)
        with block_sparse(model) if sparse else nullcontext():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask.block_mask if sparse else attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache or cache is not None,
                **kwargs,
            )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefix_len = cache.get_seq_length() if cache is not None else 0
    window = sliding_window(model.config)
    span = prefix_len + input_ids.shape[1]
    if window is not None and span > window and has_left_padding(attention_mask):
        raise ValueError(
            f"Model '{model.name_or_path}' has sliding-window attention layers, which measure "
            "the window in cache slots, so left padding would shift it and change the result. "
            f"Prefix plus sequence ({span} tokens) exceed the window ({window}): use right "
            "padding, or batch sequences of equal length (as generate() does)."
        )
    return model(
        input_ids=input_ids,
        attention_mask=prefixed_mask(prefix_len, attention_mask),
        position_ids=prefixed_positions(prefix_len, attention_mask),
        cache=cache,
        use_cache=use_cache or cache is not None,
        **kwargs,
    )


@contextmanager
def head_only_at(model: PreTrainedModel, rows: torch.Tensor, columns: torch.Tensor):
    """Within the block, the output head runs only at hidden positions ``(rows, columns)``.

    Training needs logits only where the teacher has targets. Gathering the final hidden states
    before the head, rather than the logits after it, skips the head's work elsewhere and never
    builds the ``[B, T, V]`` logits (gigabytes with a real vocabulary); the model's own head
    post-processing (e.g. logit soft-capping) still applies. Logits come out as ``[1, N, V]``.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"Model '{model.name_or_path}' has no output embeddings (lm head).")

    def gather(_module, args):
        return (args[0][rows, columns].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
