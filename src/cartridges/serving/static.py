"""The static scheduler: requests grouped by cartridge set and decoded one ``generate`` call each.

Kept for comparison with the continuous scheduler (:mod:`cartridges.serving.engine`) and as its
fallback for models that shared-prefix attention cannot reproduce exactly.

Handlers put :class:`~cartridges.serving.jobs.Job` objects on an asyncio queue. A batcher task
takes what is pending (waiting ``batch_wait_ms`` for more once one arrives), groups the jobs that
can share one ``generate`` call (same cartridge set, same temperature, same seed when sampling)
and runs each group on a single worker thread, so that the event loop keeps accepting requests
while the model decodes. A job that arrives during a decode waits for the whole batch. Rows of
one call share the cartridge's KV as a broadcast view; ``generate`` copies it into each row's
cache on its first decode step.

A streamed job gets its tokens step by step: ``generate``'s ``on_step`` callback, on the model
thread, hands them to the job's asyncio queue through ``loop.call_soon_threadsafe``.

All model work (decoding and the cartridge compatibility check) runs on that one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from cartridges.generation import Step, generate
from cartridges.prefix import forward_with_prefix
from cartridges.serving.jobs import EngineStats, Job, Row, StreamToken

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StaticEngine:
    """Owns the model thread and the request queue; decodes each group of jobs to its end.

    Args:
        model: the frozen LLM.
        stop_token_ids: tokens that end a row (the tokenizer's eos and the model's).
        pad_token_id: filler id for padding.
        max_batch_size: most rows per ``generate`` call.
        batch_wait_ms: how long to wait for more requests after the first one arrives.
    """

    scheduler = "static"

    def __init__(
        self,
        model: PreTrainedModel,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch_size: int = 32,
        batch_wait_ms: float = 5.0,
    ) -> None:
        self.model = model
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.stats = EngineStats()
        self._decoding = 0  # rows of the generate call under way
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cartridges-model")
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the batcher on the running event loop (the app's lifespan calls this)."""
        self._queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._batch_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def pending(self) -> int:
        """Jobs queued, not yet decoding."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def running(self) -> int:
        """Rows of the ``generate`` call under way."""
        return self._decoding

    async def run_on_model_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function`` on the model thread (serialised with decoding)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def submit(self, job: Job) -> list[Row]:
        """Queue ``job`` and wait for its rows."""
        await self._enqueue(job)
        return await job.future

    async def stream(self, job: Job) -> AsyncIterator[list[StreamToken]]:
        """Queue ``job`` and yield its new tokens after each decoding step, until all choices end.

        A decoding error is raised here. Leaving early (a client that went away) withdraws the
        job if its batch has not started yet.
        """
        job.tokens = asyncio.Queue()
        await self._enqueue(job)
        try:
            async for tokens in job.stream_tokens():
                yield tokens
        finally:
            job.future.cancel()

    async def _enqueue(self, job: Job) -> None:
        if self._queue is None:
            raise RuntimeError("StaticEngine.start() was not called (is the app's lifespan on?)")
        job.future = asyncio.get_running_loop().create_future()
        self.stats.requests += 1
        await self._queue.put(job)

    # ------------------------------------------------------------------ batching
    async def _batch_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while sum(len(j.prompts) for j in jobs) < self.max_batch_size:
                timeout = deadline - loop.time()
                if not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
                elif timeout > 0:
                    try:
                        jobs.append(await asyncio.wait_for(self._queue.get(), timeout))
                    except TimeoutError:
                        break
                else:
                    break
            for group in self._groups(jobs):
                await self._run_group(group)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs by group key, each group split so that no call exceeds ``max_batch_size`` rows."""
        by_key: dict[tuple, list[list[Job]]] = {}
        for job in jobs:
            if job.future is None or job.future.done():  # the client went away
                continue
            chunks = by_key.setdefault(job.group_key, [[]])
            rows = sum(len(j.prompts) for j in chunks[-1])
            if chunks[-1] and rows + len(job.prompts) > self.max_batch_size:
                chunks.append([])
            chunks[-1].append(job)
        return [chunk for chunks in by_key.values() for chunk in chunks]

    async def _run_group(self, group: list[Job]) -> None:
        try:
            results = await self.run_on_model_thread(self._decode, group)
        except Exception as error:  # noqa: BLE001 - handed to every waiting request
            logger.exception("Decoding a batch of %d requests failed", len(group))
            for job in group:
                if job.tokens is not None:
                    job.tokens.put_nowait(error)
                elif not job.future.done():
                    job.future.set_exception(error)
            return
        for job, rows in zip(group, results, strict=True):
            if not job.future.done():
                job.future.set_result(rows)

    # ------------------------------------------------------------------ model thread
    def _decode(self, group: list[Job]) -> list[list[Row]]:
        """One ``generate`` call for the whole group; rows are then cut per job."""
        prompts = [prompt for job in group for prompt in job.prompts]
        started = time.perf_counter()
        self._decoding = len(prompts)
        try:
            outputs = self._generate(group, prompts)
        finally:
            self._decoding = 0
        results, offset = [], 0
        for job in group:
            rows = []
            for prompt, output in zip(
                job.prompts, outputs[offset : offset + len(job.prompts)], strict=True
            ):
                rows.append(self._row(job, prompt, output))
            offset += len(job.prompts)
            results.append(rows)
        tokens = sum(len(row.token_ids) for rows in results for row in rows)
        self.stats.batches += 1
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(prompts))
        self.stats.generated_tokens += tokens
        logger.debug(
            "Decoded %d rows (%d jobs, %d tokens) in %.3fs",
            len(prompts),
            len(group),
            tokens,
            time.perf_counter() - started,
        )
        return results

    def _generate(self, group: list[Job], prompts: list[list[int]]) -> list:
        """The group's ``generate`` call: its first job's sampling, the largest budget and k."""
        first = group[0]
        top_k = max(job.top_logprobs for job in group)
        want_logprobs = any(job.logprobs for job in group)
        streamed = any(job.tokens is not None for job in group)
        generator = None
        if first.temperature > 0 and first.seed is not None:
            generator = torch.Generator().manual_seed(first.seed)
        return generate(
            self.model,
            prompts,
            prefix=first.cartridge,
            max_new_tokens=max(job.max_tokens for job in group),
            temperature=first.temperature,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            top_logprobs=max(top_k, 1) if want_logprobs else 0,
            generator=generator,
            on_step=_Streamer(group, self.stop_token_ids, self._loop) if streamed else None,
        )

    def _row(self, job: Job, prompt: list[int], output) -> Row:
        cut = output.token_ids[: job.max_tokens]
        stopped = output.stopped and len(cut) == len(output.token_ids)
        row = Row(token_ids=cut, stopped=stopped)
        if job.logprobs and job.tokens is None:  # a streamed job had them step by step
            top_ids = output.top_ids[: len(cut)]
            top_values = output.top_logprobs[: len(cut)]
            row.top_ids = top_ids[:, : job.top_logprobs]
            row.top_logprobs = top_values[:, : job.top_logprobs]
            row.logprobs = self._chosen_logprobs(job, prompt, cut, top_ids, top_values)
        return row

    def _chosen_logprobs(
        self,
        job: Job,
        prompt: list[int],
        generated: list[int],
        top_ids: torch.Tensor,
        top_values: torch.Tensor,
    ) -> list[float]:
        """Each generated token's log-probability: from the top-k when there, else rescored.

        A greedy token is always the top-1; a sampled one may fall outside the top-k, and then
        one extra forward over the prompt and the answer gives the exact values.
        """
        chosen = torch.tensor(generated, dtype=torch.long)[:, None]  # [n, 1]
        hits = top_ids == chosen  # [n, k]
        if bool(hits.any(dim=-1).all()):
            return top_values[hits].tolist()
        cache = job.cartridge.as_cache(1, self.model.config) if job.cartridge is not None else None
        ids = torch.tensor([prompt + generated[:-1]], dtype=torch.long, device=self.model.device)
        with torch.no_grad():
            logits = forward_with_prefix(self.model, cache, ids).logits[0, len(prompt) - 1 :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        return logprobs.gather(-1, chosen.to(logprobs.device)).squeeze(-1).tolist()


class _Streamer:
    """``on_step`` for a batch: sends each streamed job its new tokens (on the model thread).

    A row ends at a stop token or at its own job's ``max_tokens`` (the batch decodes to the
    largest); once all its rows have ended, the job gets ``None``, even while others decode on.
    """

    def __init__(
        self, group: list[Job], stop_token_ids: Sequence[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.jobs, self.stop, self.loop = group, set(stop_token_ids), loop
        self.owners = [
            (j, choice) for j, job in enumerate(group) for choice in range(len(job.prompts))
        ]
        self.left = [job.max_tokens for job in group for _ in job.prompts]  # tokens still to send
        self.open_rows = [len(job.prompts) for job in group]

    def __call__(self, step: Step) -> None:
        new: dict[int, list[StreamToken]] = {}
        for i, row in enumerate(step.rows):
            j, choice = self.owners[row]
            job = self.jobs[j]
            if job.tokens is None or self.left[row] == 0:
                continue
            self.left[row] -= 1
            token = StreamToken(choice=choice, token_id=int(step.token_ids[i]))
            if token.token_id in self.stop:
                token.finish_reason = "stop"
            elif self.left[row] == 0:
                token.finish_reason = "length"
            if token.finish_reason is not None:
                self.left[row] = 0
                self.open_rows[j] -= 1
            if job.logprobs:
                token.logprob = float(step.logprobs[i])
                token.top_ids = step.top_ids[i, : job.top_logprobs].tolist()
                token.top_logprobs = step.top_logprobs[i, : job.top_logprobs].tolist()
            new.setdefault(j, []).append(token)
        for j, tokens in new.items():
            queue = self.jobs[j].tokens
            self.loop.call_soon_threadsafe(queue.put_nowait, tokens)
            if self.open_rows[j] == 0:
                self.loop.call_soon_threadsafe(queue.put_nowait, None)
