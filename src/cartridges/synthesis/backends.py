"""Synthesis backends: whatever writes the conversations' messages and the teacher's top-k.

A backend answers a batch of conversations that all share one system message (the chunk). The
local backend runs the Hugging Face model in-process and computes the system message's KV once
for the whole batch; the OpenAI-compatible backend (``openai_backend``) sends requests to one or
more servers. Both return token ids, so the student trains on exactly the teacher's tokens.

Backends are asynchronous (``acomplete``) so that a run keeps many batches in flight when the
backend can serve them (a fleet of servers); ``batches_in_flight`` says how many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import Message, chat_ids, shared_prefix_length
from cartridges.generation import generate
from cartridges.initialization import from_token_ids

T = TypeVar("T")


def run_blocking(backend: Backend, work: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine of ``backend`` to its end, then release what it opened."""

    async def run() -> T:
        try:
            return await work
        finally:
            await backend.aclose()

    return asyncio.run(run())


class BackendError(RuntimeError):
    """A backend cannot be used: unreachable, wrong tokenizer, or malformed answers."""


@dataclass
class Completion:
    """One generated message: its tokens, and per token the teacher's top-k (if requested)."""

    token_ids: list[int]
    text: str
    stopped: bool  # False: cut by the token limit
    # [T, K] per generated token from the first on (-inf log-probability where a server sent
    # fewer than K); T may be one short of token_ids when a server leaves out the stop token.
    top_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int32))
    top_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


class Backend(Protocol):
    """Completes conversations that share a system message."""

    @property
    def requests_in_flight(self) -> int:
        """Requests being served right now (for progress reports)."""
        ...

    def batches_in_flight(self, batch_size: int) -> int:
        """How many batches of ``batch_size`` rows a run should keep going at once."""
        ...

    async def acomplete(
        self,
        system: str,
        conversations: Sequence[Sequence[Message]],
        *,
        temperature: float,
        max_tokens: int,
        top_logprobs: int = 0,
        seed: int = 0,
    ) -> list[Completion]: ...

    async def aclose(self) -> None:
        """Release what ``acomplete`` opened (connections); called at the end of a run."""
        ...

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
        self._running = 0

    @property
    def requests_in_flight(self) -> int:
        return self._running

    def batches_in_flight(self, batch_size: int) -> int:
        return 1  # one model: batches take turns (its batch already fills the device)

    async def acomplete(
        self,
        system: str,
        conversations: Sequence[Sequence[Message]],
        *,
        temperature: float,
        max_tokens: int,
        top_logprobs: int = 0,
        seed: int = 0,
    ) -> list[Completion]:
        """:meth:`complete` in a worker thread, so the event loop keeps writing shards."""
        self._running = len(conversations)
        try:
            return await asyncio.to_thread(
                self.complete,
                system,
                conversations,
                temperature=temperature,
                max_tokens=max_tokens,
                top_logprobs=top_logprobs,
                seed=seed,
            )
        finally:
            self._running = 0

    async def aclose(self) -> None:
        return None

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
                    top_ids=g.top_ids.numpy().astype(np.int32),
                    top_logprobs=g.top_logprobs.numpy().astype(np.float32),
                )
            )
        return completions
