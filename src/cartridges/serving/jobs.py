"""What the routes hand a decoding engine, and what they get back: jobs, rows, streamed tokens.

Both schedulers (:mod:`cartridges.serving.engine`, continuous, and
:mod:`cartridges.serving.static`, static) take the same :class:`Job`, answer with the same
:class:`Row` or :class:`StreamToken` objects and keep the same :class:`EngineStats`, so that the
routes, the text rendering and ``/health`` do not depend on which one decodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from cartridges.cartridge import Cartridge

T = TypeVar("T")


@dataclass
class Row:
    """One generated choice, cut to its request's own ``max_tokens``.

    Attributes:
        token_ids: generated ids, the stop token included when one ended the row.
        stopped: a stop token ended it (else ``max_tokens`` did).
        logprobs: log-probability of each generated token under the model (empty if not asked).
        top_ids: ``(n, k)`` most likely ids per position (``k = 0``: not asked).
        top_logprobs: ``(n, k)`` their log-probabilities.
    """

    token_ids: list[int]
    stopped: bool
    logprobs: list[float] = field(default_factory=list)
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


@dataclass
class StreamToken:
    """One token of a streamed choice, sent as soon as the model has chosen it.

    Attributes:
        choice: index of its row in the job's ``prompts``.
        token_id: the token.
        logprob: its log-probability (``None`` if not asked).
        top_ids: the ``top_logprobs`` most likely ids at its position.
        top_logprobs: their log-probabilities.
        finish_reason: ``"stop"`` (a stop token) or ``"length"`` (``max_tokens``) on the
            choice's last token, else ``None``.
    """

    choice: int
    token_id: int
    logprob: float | None = None
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Job:
    """One request's rows (``n`` choices per prompt) and its sampling settings."""

    prompts: list[list[int]]
    cartridge_key: tuple
    cartridge: Cartridge | None
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    future: asyncio.Future | None = None
    # A streamed job's new tokens per step, then None (or the decoding error).
    tokens: asyncio.Queue[list[StreamToken] | Exception | None] | None = None

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys can be decoded in one ``generate`` call (static scheduler)."""
        sampled = self.temperature > 0
        return (self.cartridge_key, self.temperature if sampled else 0.0, sampled and self.seed)

    async def stream_tokens(self) -> AsyncIterator[list[StreamToken]]:
        """The tokens the engine sends this (streamed) job, step by step, until its end marker;
        an error the engine sent instead is raised here."""
        while (tokens := await self.tokens.get()) is not None:
            if isinstance(tokens, Exception):
                raise tokens
            yield tokens


@dataclass
class EngineStats:
    """Counters exposed on ``/health`` (and used by tests to see batching happen).

    Attributes:
        requests: jobs submitted.
        batches: forwards of several rows: ``generate`` calls (static) or steps (continuous).
        max_batch_rows: most rows in one of them.
        generated_tokens: tokens decoded for the jobs.
    """

    requests: int = 0
    batches: int = 0
    max_batch_rows: int = 0
    generated_tokens: int = 0


class Engine(Protocol):
    """What the routes and the service need of a scheduler."""

    scheduler: str
    stats: EngineStats

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def running(self) -> int: ...

    @property
    def pending(self) -> int: ...

    async def run_on_model_thread(self, function: Callable[..., T], *args: Any) -> T: ...

    async def submit(self, job: Job) -> list[Row]: ...

    def stream(self, job: Job) -> AsyncIterator[list[StreamToken]]: ...
