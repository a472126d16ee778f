"""The ``local`` self-study backend: the Hugging Face model in-process.

All rows of a batch share the system message (the chunk), so its KV is computed once per batch
and every row generates after it. Generation runs in a worker thread: the event loop keeps
writing finished shards meanwhile, and batches take turns on the one model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import Message, chat_ids, shared_prefix_length
from cartridges.generation import Generation, default_stop_ids, generate
from cartridges.initialization import from_token_ids
from cartridges.modeling import context_length, load_model_from, model_fingerprint, pad_token_id
from cartridges.synthesis.backends import BlockingCalls, Completion, Sampling


class LocalBackend(BlockingCalls):
    """The model in-process: one prefill of the shared system message per batch."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = default_stop_ids(model, tokenizer)  # every id that ends a turn
        self.pad_id = pad_token_id(tokenizer)
        self.max_length = context_length(model.config)
        self._running = 0

    @property
    def requests_in_flight(self) -> int:
        return self._running

    def batches_in_flight(self, batch_size: int) -> int:
        return 1  # one model: batches take turns (its batch already fills the device)

    def identity(self) -> str:
        """The model's name and a fingerprint of its weights and config."""
        return f"local:{self.model.name_or_path}:{model_fingerprint(self.model)}"

    async def acomplete(
        self, system: str, conversations: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[Completion]:
        """:meth:`generate_batch` in a worker thread, so the event loop keeps writing shards."""
        self._running = len(conversations)
        try:
            return await asyncio.to_thread(self.generate_batch, system, conversations, sampling)
        finally:
            self._running = 0

    async def aclose(self) -> None:
        return None

    def complete(
        self, system: str, conversations: Sequence[Sequence[Message]], **sampling: Any
    ) -> list[Completion]:
        """:meth:`generate_batch` in this thread (no event loop: it also runs in notebooks)."""
        return self.generate_batch(system, conversations, Sampling(**sampling))

    def generate_batch(
        self, system: str, conversations: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[Completion]:
        """Complete every conversation after one shared prefill, in the calling thread."""
        rows = [
            chat_ids(
                self.tokenizer,
                [{"role": "system", "content": system}, *c],
                True,
                template_kwargs=sampling.template_kwargs,
            )
            for c in conversations
        ]
        longest = max(len(r) for r in rows) + sampling.max_tokens
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
            max_new_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            stop_token_ids=self.stop_ids,
            pad_token_id=self.pad_id,
            top_logprobs=sampling.top_logprobs,
            generator=torch.Generator().manual_seed(sampling.seed),
        )
        return [self._completion(g) for g in generations]

    def _completion(self, generation: Generation) -> Completion:
        text_ids = [t for t in generation.token_ids if t not in self.stop_ids]
        return Completion(
            token_ids=generation.token_ids,
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
            stopped=generation.stopped,
            top_ids=generation.top_ids.numpy().astype(np.int32),
            top_logprobs=generation.top_logprobs.numpy().astype(np.float32),
        )


def from_settings(settings: None, model: Any) -> LocalBackend:
    """The registry's builder: the ``model`` block's model (the ``local`` kind has no settings)."""
    return LocalBackend(*load_model_from(model))
