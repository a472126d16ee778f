"""The continuous scheduler: one model thread steps a ContinuousBatcher while there is work.

Requests join the running decode at the next step and leave when they finish, whatever their
cartridges and lengths (:class:`cartridges.decoding.continuous.ContinuousBatcher`): a short request
that arrives while a long one decodes is answered before the long one ends, and each cartridge's KV
is stored once however many rows attend to it.

Each choice of a :class:`~cartridges.serving.jobs.Job` becomes one
:class:`~cartridges.decoding.continuous.Request` (``n`` choices, ``n`` requests) with the job's
``max_tokens``, temperature and log-probability settings. Seeded sampling is reproducible per
choice: choice ``i`` of a job with ``seed`` samples from its own generator seeded with
``seed + i``, so a choice's answer depends neither on the other requests in the batch nor on
when it joined (choice 0 of ``seed=s`` answers as a single request with ``seed=s`` does).

Threads: the event loop only posts messages (a job to add, a job to withdraw, a function to
run) to the model thread's inbox and wakes it. The model thread handles its inbox between steps,
steps while the batcher has work and sleeps on an event otherwise; each step's tokens go back to
their jobs through ``loop.call_soon_threadsafe``: a streamed job's asyncio queue gets them per
step, a whole answer's future gets its :class:`~cartridges.serving.jobs.Row` objects at the end.
Every batcher call and every other use of the model (the cartridge check) runs on that thread.

Failures: a forward that fails (:class:`~cartridges.decoding.continuous.StepFailed`) fails the jobs
of its requests; the others decode on. Anything else leaves the batcher in an unknown state: every
job in flight gets the error and a fresh batcher takes over.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from cartridges.decoding.continuous import ContinuousBatcher, Request, StepFailed, Token
from cartridges.serving.jobs import EngineStats, Job, Row, StreamToken

logger = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()  # the inbox message that ends the model thread


@dataclass(eq=False)
class _Active:
    """A job being decoded: its requests' ids (one per choice) and what they produced so far."""

    job: Job
    request_ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    top: list[tuple[list[list[int]], list[list[float]]]] = field(default_factory=list)
    open: int = 0

    def keep(self, choice: int, token: Token) -> None:
        """Add ``token`` to the whole answer of ``choice``."""
        row, (top_ids, top_values) = self.rows[choice], self.top[choice]
        row.token_ids.append(token.token_id)
        row.stopped = token.finish_reason == "stop"
        if self.job.logprobs:
            row.logprobs.append(token.logprob)
            top_ids.append(token.top_ids)
            top_values.append(token.top_logprobs)

    def answers(self) -> list[Row]:
        """The rows, with their top-k as ``(n, k)`` tensors when log-probabilities were asked."""
        if self.job.logprobs:
            k = self.job.top_logprobs
            for row, (top_ids, top_values) in zip(self.rows, self.top, strict=True):
                row.top_ids = torch.tensor(top_ids, dtype=torch.long).reshape(-1, k)
                row.top_logprobs = torch.tensor(top_values, dtype=torch.float32).reshape(-1, k)
        return self.rows


class ContinuousEngine:
    """Owns the model thread and its :class:`~cartridges.decoding.continuous.ContinuousBatcher`.

    Args:
        model: the frozen LLM; one that shared-prefix attention cannot reproduce raises
            :class:`~cartridges.decoding.shared_prefix.UnsupportedModelError` here.
        stop_token_ids: tokens that end a choice (the tokenizer's eos and the model's).
        pad_token_id: filler id of left padding in a prefill.
        max_batch_size: most requests (choices) decoding at once.
        kv_budget_tokens: most KV tokens held at once (``None``: unbounded); admission reserves
            each request's worst case (prompt + ``max_tokens``, and its cartridges once).
    """

    scheduler = "continuous"

    def __init__(
        self,
        model: PreTrainedModel,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch_size: int = 32,
        kv_budget_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.stop_token_ids = tuple(stop_token_ids)
        self._batcher_args = dict(
            max_batch_size=max_batch_size,
            kv_budget_tokens=kv_budget_tokens,
            pad_token_id=pad_token_id,
        )
        self.batcher = ContinuousBatcher(model, **self._batcher_args)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[Callable[[], None] | object] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._jobs: dict[int, _Active] = {}  # id(job) -> its state (model thread only)
        self._owners: dict[int, tuple[_Active, int]] = {}  # request id -> (job, choice)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the model thread (the app's lifespan calls this on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="cartridges-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End the model thread; jobs still in flight get an error."""
        if self._thread is not None:
            self._post(_STOP)
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return self.batcher.num_running

    @property
    def pending(self) -> int:
        """Requests waiting for room in the batch."""
        return self.batcher.num_waiting

    # ------------------------------------------------------------------ event loop side
    async def run_on_model_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function`` on the model thread, between two steps."""
        future: Future[T] = Future()

        def call() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)

        self._post(call)
        return await asyncio.wrap_future(future)

    async def submit(self, job: Job) -> list[Row]:
        """Queue ``job`` and wait for its rows; a caller that is cancelled withdraws it."""
        self._enqueue(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self.withdraw(job)
            raise

    async def stream(self, job: Job) -> AsyncIterator[list[StreamToken]]:
        """Queue ``job`` and yield its new tokens after each step, until all its choices end.

        A decoding error is raised here. Leaving early (a client that went away) withdraws the
        job's requests: they leave the batch before the next forward.
        """
        job.tokens = asyncio.Queue()
        self._enqueue(job)
        try:
            async for tokens in job.stream_tokens():
                yield tokens
        finally:
            job.future.cancel()
            self.withdraw(job)

    def withdraw(self, job: Job) -> None:
        """Withdraw ``job`` (its client went away): its requests leave before the next forward.

        Finished jobs are ignored; any thread may call this.
        """
        self._post(lambda: self._withdraw(job))

    def _enqueue(self, job: Job) -> None:
        if self._thread is None:
            raise RuntimeError("ContinuousEngine.start() was not called (is the lifespan on?)")
        job.future = self._loop.create_future()
        self.stats.requests += 1
        self._post(lambda: self._add(job))

    def _post(self, message: Callable[[], None] | object) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ------------------------------------------------------------------ model thread
    def _serve(self) -> None:
        """Handle the inbox, step while there is work, sleep when there is none."""
        while True:
            self._wake.clear()
            while True:
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if message is _STOP:
                    self._fail_all(RuntimeError("The server is shutting down."))
                    return
                self._guarded(message)
            if self.batcher.has_work:
                self._guarded(self._step)
            else:
                self._wake.wait()

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run ``work``; an error it lets through fails every job in flight, and a fresh batcher
        takes over (the old one's state is unknown), so that the model thread never dies."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - handed to every job in flight
            logger.exception("The model thread failed; every request in flight fails with it")
            self._fail_all(error)
            self._owners.clear()
            self.batcher = ContinuousBatcher(self.model, **self._batcher_args)

    def _add(self, job: Job) -> None:
        """Add one request per choice of ``job`` (none if its client has gone already)."""
        if job.future.done():
            return
        active = _Active(job, open=len(job.prompts))
        self._jobs[id(job)] = active
        try:
            for choice, prompt in enumerate(job.prompts):
                request_id = self.batcher.add(self._request(job, choice, prompt))
                active.request_ids.append(request_id)
                active.rows.append(Row(token_ids=[], stopped=False))
                active.top.append(([], []))
                self._owners[request_id] = (active, choice)
        except Exception as error:  # noqa: BLE001 - a request the batcher refuses fails its job
            self._fail(active, error)

    def _request(self, job: Job, choice: int, prompt: list[int]) -> Request:
        """The batcher's request for one choice; ``seed + choice`` seeds a sampled one."""
        sampled = job.temperature > 0 and job.seed is not None
        return Request(
            prompt=prompt,
            prefix=job.cartridge,
            max_new_tokens=job.max_tokens,
            temperature=job.temperature,
            seed=job.seed + choice if sampled else None,
            logprobs=job.logprobs,
            top_logprobs=job.top_logprobs,
            stop_token_ids=self.stop_token_ids,
        )

    def _withdraw(self, job: Job) -> None:
        """Cancel the requests of a job whose client went away."""
        active = self._jobs.pop(id(job), None)
        if active is not None:
            self._release(active)

    def _release(self, active: _Active) -> None:
        """Forget ``active``'s requests; those still decoding or waiting are cancelled."""
        self._jobs.pop(id(active.job), None)
        for request_id in active.request_ids:
            if self._owners.pop(request_id, None) is not None:
                self.batcher.cancel(request_id)

    def _step(self) -> None:
        """One step; its tokens go to their jobs, a failed forward's jobs get its error."""
        try:
            tokens, failed = self.batcher.step(), None
        except StepFailed as failure:
            tokens, failed = failure.tokens, failure
            logger.exception("Decoding requests %s failed", failure.request_ids)
        rows = len(tokens) + (len(failed.request_ids) if failed is not None else 0)
        self.stats.batches += 1
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, rows)
        self.stats.generated_tokens += len(tokens)
        self._deliver(tokens)
        if failed is not None:
            for request_id in failed.request_ids:
                owner = self._owners.get(request_id)
                if owner is not None:
                    self._fail(owner[0], failed)

    def _deliver(self, tokens: list[Token]) -> None:
        """Hand each job its tokens of this step; end the jobs whose choices have all ended."""
        streamed: dict[int, tuple[_Active, list[StreamToken]]] = {}
        finished: list[_Active] = []
        for token in tokens:
            owner = self._owners.get(token.request_id)
            if owner is None:  # withdrawn meanwhile
                continue
            active, choice = owner
            if active.job.tokens is not None:
                piece = _stream_token(active.job, choice, token)
                streamed.setdefault(id(active), (active, []))[1].append(piece)
            else:
                active.keep(choice, token)
            if token.finished:
                del self._owners[token.request_id]
                active.open -= 1
                if active.open == 0:
                    finished.append(active)
        for active, pieces in streamed.values():
            self._loop.call_soon_threadsafe(active.job.tokens.put_nowait, pieces)
        for active in finished:
            self._jobs.pop(id(active.job), None)
            if active.job.tokens is not None:
                self._loop.call_soon_threadsafe(active.job.tokens.put_nowait, None)
            else:
                self._loop.call_soon_threadsafe(_resolve, active.job.future, active.answers())

    def _fail(self, active: _Active, error: Exception) -> None:
        """``active``'s job gets ``error``; its other requests are cancelled."""
        self._release(active)
        job = active.job
        if job.tokens is not None:
            self._loop.call_soon_threadsafe(job.tokens.put_nowait, error)
        else:
            self._loop.call_soon_threadsafe(_reject, job.future, error)

    def _fail_all(self, error: Exception) -> None:
        for active in list(self._jobs.values()):
            self._fail(active, error)


def _stream_token(job: Job, choice: int, token: Token) -> StreamToken:
    piece = StreamToken(choice=choice, token_id=token.token_id, finish_reason=token.finish_reason)
    if job.logprobs:
        piece.logprob = token.logprob
        piece.top_ids, piece.top_logprobs = token.top_ids, token.top_logprobs
    return piece


def _resolve(future: asyncio.Future, rows: list[Row]) -> None:
    if not future.done():
        future.set_result(rows)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
