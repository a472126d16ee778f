"""What every self-study backend shares: the request, the answer, the error and the contract.

A backend writes the messages of a batch of conversations that all share one system message (the
chunk), and returns token ids, so the student trains on exactly the teacher's tokens. Each kind
of backend lives in its own module (``local_backend``: the model in-process; ``openai_backend``:
OpenAI-compatible servers) and is named in :mod:`cartridges.synthesis.registry`; nothing else in
the project tells the kinds apart.

Backends are asynchronous (``acomplete``) so that a run keeps many batches in flight when the
backend can serve them (a fleet of servers); ``batches_in_flight`` says how many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from cartridges.chat import Message

T = TypeVar("T")


class BackendError(RuntimeError):
    """A backend cannot be used: unreachable, wrong tokenizer, or malformed answers."""


@dataclass(frozen=True)
class Sampling:
    """How one call writes every row of its batch: one object, so each backend reads it alike."""

    temperature: float
    max_tokens: int
    top_logprobs: int = 0  # teacher entries kept per generated token (0: none)
    seed: int = 0  # row i samples with seed + i (the local backend: one generator per batch)
    # Chat-template switches for rendering the conversation, e.g. {"enable_thinking": False}.
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)


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

    max_length: int | None
    """Tokens a conversation may span (chunk, messages and answer); ``None``: unknown."""

    @property
    def requests_in_flight(self) -> int:
        """Requests being served right now (for progress reports)."""
        ...

    def batches_in_flight(self, batch_size: int) -> int:
        """How many batches of ``batch_size`` rows a run should keep going at once."""
        ...

    def identity(self) -> str:
        """What answers, as a string: part of a run's resume key (another teacher, another run)."""
        ...

    async def acomplete(
        self, system: str, conversations: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[Completion]: ...

    async def aclose(self) -> None:
        """Release what ``acomplete`` opened (connections); called at the end of a run."""
        ...


class BlockingCalls:
    """The blocking form of ``acomplete``, shared by the backends (scripts, tests, benchmarks)."""

    def complete(
        self, system: str, conversations: Sequence[Sequence[Message]], **sampling: Any
    ) -> list[Completion]:
        """Complete a batch and wait for it; ``sampling`` holds :class:`Sampling`'s fields."""
        return run_blocking(self, self.acomplete(system, conversations, Sampling(**sampling)))


def run_blocking(backend: Backend, work: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine of ``backend`` to its end, then release what it opened."""

    async def run() -> T:
        try:
            return await work
        finally:
            await backend.aclose()

    return asyncio.run(run())
