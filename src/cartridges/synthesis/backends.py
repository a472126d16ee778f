"""Synthesis backends: whatever writes the conversations' messages and the teacher's top-k.

A backend answers a batch of conversations that all share one system message (the chunk). The
local backend runs the Hugging Face model in-process and computes the system message's KV once
for the whole batch; the OpenAI-compatible backend (``openai_backend``) sends requests to one or
more servers. Both return token ids, so the student trains on exactly the teacher's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import Message, chat_ids, shared_prefix_length
from cartridges.generation import generate
from cartridges.initialization import from_token_ids


@dataclass
class Completion:
    """One generated message: its tokens, and per token the teacher's top-k (if requested)."""

    token_ids: list[int]
    text: str
    stopped: bool  # False: cut by the token limit
    # Per generated token from the first on; may be shorter than token_ids when a server
    # does not report the final stop token.
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


class Backend(Protocol):
    """Completes conversations that share a system message."""

    def complete(
        self,
        system: str,
        conversations: Sequence[Sequence[Message]],
        *,
        temperature: float,
        max_tokens: int,
        top_logprobs: int = 0,
        seed: int = 0,
    ) -> list[Completion]: ...


class LocalBackend:
    """The model in-process: one prefill of the shared system message per batch."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    def complete(
        self,
        system: str,
        conversations: Sequence[Sequence[Message]],
        *,
        temperature: float,
        max_tokens: int,
        top_logprobs: int = 0,
        seed: int = 0,
    ) -> list[Completion]:
        rows = [
            chat_ids(self.tokenizer, [{"role": "system", "content": system}, *c], True)
            for c in conversations
        ]
        longest = max(len(r) for r in rows) + max_tokens
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(
                f"A conversation of {longest} tokens (chunk, messages and max_tokens) exceeds the "
                f"model's context of {self.max_length}: use shorter chunks, or set "
                "self_study.truncate_chunks to cut chunks to fit."
            )
        shared = shared_prefix_length(rows)
        prefix = (
            from_token_ids(self.model, rows[0][:shared], num_frozen_tokens=0) if shared else None
        )
        generations = generate(
            self.model,
            [row[shared:] for row in rows],
            prefix=prefix,
            max_new_tokens=max_tokens,
            temperature=temperature,
            stop_token_ids=self.stop_ids,
            pad_token_id=self.pad_id,
            top_logprobs=top_logprobs,
            generator=torch.Generator().manual_seed(seed),
        )
        completions = []
        for g in generations:
            text_ids = [t for t in g.token_ids if t not in self.stop_ids]
            completions.append(
                Completion(
                    token_ids=g.token_ids,
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                    stopped=g.stopped,
                    top_ids=g.top_ids.tolist(),
                    top_logprobs=g.top_logprobs.tolist(),
                )
            )
        return completions
