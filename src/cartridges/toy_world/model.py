"""The toy-world model: a tiny Llama whose input embedding also sees the previous tokens.

Tiny plain transformers learn in-context retrieval only after a long plateau (an induction circuit
must form). Adding learned embeddings of the previous ``shift_width`` tokens to each token's
embedding (a short convolution, as in the Zoology/Based line of work) makes retrieval learnable in
seconds. Everything else is a stock ``LlamaForCausalLM``: keys and values in the KV cache are the
normal post-RoPE Llama ones, so a cartridge (a trained KV prefix) plugs in through the standard
cache API.

Shift semantics. Some ids are *segment starts* (``config.segment_start_token_ids``: pad, bos and
the chat role tokens). Token ``t`` receives ``shift_embed[o-1](x[t-o])`` for ``o = 1..shift_width``
only if ``x[t]`` is not a segment start and no segment start lies strictly between ``t-o`` and
``t`` (the earlier token may itself be a segment start). Positions masked out by
``attention_mask`` count as segment starts and contribute nothing. A cache has no token ids, so
after each forward the last ``shift_width`` ids are stored on the cache object as
``cache._toy_prev_ids`` (``(batch, shift_width)`` LongTensor, ``-1`` = absent) and used by the next
incremental forward. A cache without that attribute (e.g. built from cartridge tensors) means "no
usable earlier tokens". Hence for any query starting with a segment-start token, running it after
a KV prefix gives the same logits as running it after the prefix's tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

logger = logging.getLogger(__name__)

PREV_IDS_ATTR = "_toy_prev_ids"
"""Name of the cache attribute holding the last ``shift_width`` token ids (-1 = absent)."""

ABSENT = -1


@strict
class ToyWorldConfig(LlamaConfig):
    """``LlamaConfig`` plus the shift-embedding settings."""

    model_type = "toy_world_llama"

    shift_width: int = 2
    segment_start_token_ids: list[int] | None = None


class ToyWorldForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose token embedding adds embeddings of the previous tokens."""

    config_class = ToyWorldConfig
    config: ToyWorldConfig

    def __init__(self, config: ToyWorldConfig) -> None:
        super().__init__(config)
        self.shift_embeds = nn.ModuleList(
            [nn.Embedding(config.vocab_size, config.hidden_size) for _ in range(config.shift_width)]
        )
        for emb in self.shift_embeds:
            nn.init.normal_(emb.weight, std=config.initializer_range)
        self._segment_start_list = sorted(set(config.segment_start_token_ids or []))

    # ----------------------------------------------------------------------------------------------
    def _shifted_embeddings(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Token + shift embeddings for ``input_ids``; also the ids to remember on the cache."""
        bsz, seq = input_ids.shape
        width = self.config.shift_width
        device = input_ids.device
        ids = input_ids.clone()
        # Padding (attention_mask == 0) never leaks into the shift: mark it absent.
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and attention_mask.shape[-1] >= seq
        ):
            ids = ids.masked_fill(attention_mask[:, -seq:].to(device) == 0, ABSENT)
        prev = None
        if cache is not None and cache.get_seq_length() > 0:
            prev = getattr(cache, PREV_IDS_ATTR, None)
            if prev is not None and (prev.shape[0] != bsz or prev.shape[1] != width):
                prev = None  # e.g. a cache expanded for beam search: fall back to "absent"
        if prev is None:
            prev = torch.full((bsz, width), ABSENT, dtype=torch.long, device=device)
        ext = torch.cat([prev.to(device), ids], dim=1)  # (bsz, width + seq)
        seg_ids = torch.tensor(self._segment_start_list, dtype=torch.long, device=device)
        blocker = (ext == ABSENT) | torch.isin(ext, seg_ids)
        cum = blocker.long().cumsum(dim=1)  # blockers at or before each position
        cur = torch.arange(width, width + seq, device=device)
        embeds = self.model.embed_tokens(input_ids)
        cur_ok = ~blocker[:, cur]
        for o in range(1, width + 1):
            src = cur - o
            # blockers strictly between src and cur: cum[cur-1] - cum[src]
            between = cum[:, cur - 1] - cum[:, src]
            valid = cur_ok & (between == 0) & (ext[:, src] != ABSENT)
            src_ids = ext[:, src].clamp(min=0)
            embeds = embeds + self.shift_embeds[o - 1](src_ids) * valid.unsqueeze(-1).to(
                embeds.dtype
            )
        return embeds, ext[:, -width:]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Llama forward with shifted input embeddings; remembers the last ids on the cache.

        ``inputs_embeds`` given instead of ``input_ids`` are used as they are (no shift).
        """
        if cache is None and past_key_values is not None:
            cache = past_key_values
        new_prev = None
        if input_ids is not None:
            if inputs_embeds is not None:
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            inputs_embeds, new_prev = self._shifted_embeddings(input_ids, attention_mask, cache)
        out = super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        out_cache = getattr(out, "cache", None)
        if out_cache is not None:
            if new_prev is not None:
                setattr(out_cache, PREV_IDS_ATTR, new_prev.detach())
            elif hasattr(out_cache, PREV_IDS_ATTR):
                delattr(out_cache, PREV_IDS_ATTR)  # embeddings given: earlier ids unknown
        return out


_REGISTERED = False


def register() -> None:
    """Register the config and model with the Auto classes (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    AutoConfig.register(ToyWorldConfig.model_type, ToyWorldConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyWorldConfig, ToyWorldForCausalLM, exist_ok=True)
    _REGISTERED = True


register()
