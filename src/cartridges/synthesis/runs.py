"""Resumable self-study runs: batches in flight, one shard per batch, tables over the shards.

Many batches run at once when the backend can serve them (a fleet of servers); each is written
to its own shard as soon as it completes, in whatever order they complete, so a run killed at
any point (even ``kill -9``) and restarted runs only the missing batches and produces the same
conversations, none lost and none twice. The shard folder may be on an object store (a URL): a
job killed on one machine resumes on another. What one batch holds is
``cartridges.synthesis.self_study``'s part; this module only schedules, stores and resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cartridges.files import make_read_only
from cartridges.lineage import RUN_ID
from cartridges.progress import progress_bar
from cartridges.storage import HeldLock, Location
from cartridges.synthesis.backends import Backend, BackendError
from cartridges.synthesis.self_study import Conversation, SelfStudy, SelfStudyConfig
from cartridges.tables import ShardedTable, ShardError, parquet_file, write_parquet

logger = logging.getLogger(__name__)

ROW_GROUP_SIZE = 65_536  # rows of teacher targets per parquet row group (a few conversations)


# --------------------------------------------------------------------------- tables
def conversation_tables(conversations: Sequence[Conversation]) -> tuple[pa.Table, pa.Table]:
    """The ``conversations`` and flat ``teacher_logprobs`` tables of some conversations.

    Built column by column from arrays (an answer's targets are ~10k entries), with compact
    types: int32 positions and token ids, float32 log-probabilities.
    """
    conversations_table = pa.table(
        {
            "conversation_id": [c.conversation_id for c in conversations],
            "chunk_id": [c.chunk_id for c in conversations],
            "seed_type": [c.seed_type for c in conversations],
            "seed_prompt": [c.seed_prompt for c in conversations],
            "messages": [json.dumps(c.messages, ensure_ascii=False) for c in conversations],
            "token_ids": pa.array([c.token_ids for c in conversations], pa.list_(pa.int32())),
            "answer_start": pa.array([c.answer_start for c in conversations], pa.int32()),
            "answer_truncated": [c.answer_truncated for c in conversations],
            "num_tokens": pa.array([len(c.token_ids) for c in conversations], pa.int32()),
        }
    )
    counts = [len(c.targets) for c in conversations]
    ids = pa.array([c.conversation_id for c in conversations], pa.string())
    empty = [np.zeros(0, dtype=np.int32)]
    targets_table = pa.table(
        {
            "conversation_id": ids.take(pa.array(np.repeat(np.arange(len(counts)), counts))),
            "position": np.concatenate([c.targets.position for c in conversations] or empty),
            "token_id": np.concatenate([c.targets.token_id for c in conversations] or empty),
            "logprob": np.concatenate(
                [c.targets.logprob for c in conversations] or [np.zeros(0, dtype=np.float32)]
            ),
        }
    )
    return conversations_table, targets_table


# --------------------------------------------------------------------------- resumable runs
CHUNK_ORDER = "batch i reads chunk i mod n"
"""How batches pick chunks; part of the run key, so runs of an earlier order never resume here."""


def chunks_read(config: SelfStudyConfig, num_chunks: int) -> int:
    """How many of the chunk set's first chunks the run's batches read (batch i reads i mod n)."""
    return min(config.num_batches, num_chunks)


def run_key(config: SelfStudyConfig, chunks: Sequence[tuple[str, str]], backend_id: str) -> str:
    """Identifies a run: shards are reused only by a run with the same inputs and settings.

    ``num_conversations`` is left out: a batch's content does not depend on it, so a larger
    run reuses (extends) a smaller one's shards.
    """
    digest = hashlib.sha256(json.dumps(config.resume_identity(), sort_keys=True).encode())
    digest.update(backend_id.encode())
    digest.update(CHUNK_ORDER.encode())
    for chunk_id, text in chunks:
        digest.update(f"{chunk_id}\0{text}\0".encode())
    return digest.hexdigest()[:16]


LOCK_FILE = ".lock"
"""Held by the process running a self-study into its directory: a second one waits its turn."""


def _shard(directory: Location, kind: str, batch_index: int) -> Location:
    return directory / f"{kind}-{batch_index:06d}.parquet"


def _write_atomically(table: pa.Table, path: Location) -> None:
    # Bounded row groups: training reads one conversation's targets by decoding its row group.
    # Read-only once written: catalog versions hard-link these files, so no writer may alter
    # them in place (a byte changed anyway fails its page checksum when read).
    with path.write_file() as temporary:
        write_parquet(table, temporary, row_group_size=ROW_GROUP_SIZE)
        make_read_only(temporary)


def _write_batch(
    directory: Location, batch_index: int, conversations: list[Conversation], lock: HeldLock
) -> None:
    conversations_table, targets_table = conversation_tables(conversations)
    # The targets shard first: a conversations shard marks the batch complete.
    lock.check()  # a lease on an object store can be lost: never write beside its new holder
    _write_atomically(targets_table, _shard(directory, "targets", batch_index))
    lock.check()
    _write_atomically(conversations_table, _shard(directory, "conversations", batch_index))


def _finished_batches(directory: Location) -> set[int]:
    return {
        int(name.removesuffix(".parquet").split("-")[1])
        for name in directory.children()
        if name.startswith("conversations-") and name.endswith(".parquet")
    }


def _table(*files: Location) -> ShardedTable:
    return ShardedTable([f.path for f in files], store=files[0].store)


def _intact_batches(directory: Location, finished: set[int]) -> set[int]:
    """The finished batches whose shards pass every page checksum; the others are removed
    (with a warning naming the file) so that they are synthesised again."""
    intact = set()
    with progress_bar(total=len(finished), desc="verify shards", unit="batch") as bar:
        for batch_index in sorted(finished):
            try:
                for kind in ("targets", "conversations"):
                    _table(_shard(directory, kind, batch_index)).verify()
                intact.add(batch_index)
            except ShardError as error:
                logger.warning("Synthesising batch %d again: %s", batch_index, error)
                for kind in ("conversations", "targets"):  # the conversations shard marks it done
                    _shard(directory, kind, batch_index).remove()
            bar.update()
    return intact


@dataclass
class _Throughput:
    """What the progress bar and the totals report about this run's fresh work."""

    started: float = field(default_factory=time.perf_counter)
    conversations: int = 0
    tokens: int = 0
    replies: int = 0  # questions and answers returned, finished conversations or not

    def postfix(self, backend: Backend) -> dict[str, str]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {
            "replies": str(self.replies),
            "in_flight": str(backend.requests_in_flight),
            "conv_per_s": f"{self.conversations / seconds:.1f}",
            "tok_per_s": f"{self.tokens / seconds:.0f}",
        }


async def _synthesize(
    study: SelfStudy,
    chunks: Sequence[tuple[str, str]],
    directory: Location,
    batches: Sequence[int],
    progress,
    throughput: _Throughput,
    lock: HeldLock,
) -> None:
    """Run ``batches`` with as many in flight as the backend serves; write each as it ends."""
    config, backend = study.config, study.backend
    pending = iter(batches)

    def on_replies(count: int) -> None:
        # A batch finishes all its conversations at once, after 2 x rounds calls of the
        # backend (~a minute each for a small model on CPUs): show the replies as they come.
        throughput.replies += count
        progress.set_postfix(throughput.postfix(backend), refresh=False)
        progress.update(0)  # redraws when the bar's interval has passed

    async def worker() -> None:
        for batch_index in pending:  # shared: each worker takes the next batch when free
            chunk_id, text = chunks[batch_index % len(chunks)]
            try:
                conversations = await study.arun_batch(batch_index, chunk_id, text, on_replies)
            except BackendError as error:
                raise BackendError(
                    f"Self-study batch {batch_index} (chunk {chunk_id}) failed: {error} "
                    f"Finished batches are kept in {directory}; rerun to resume."
                ) from error
            await asyncio.to_thread(_write_batch, directory, batch_index, conversations, lock)
            kept = conversations[: config.rows_kept(batch_index)]
            throughput.conversations += len(kept)
            throughput.tokens += sum(len(c.token_ids) for c in kept)
            progress.update(len(kept))
            progress.set_postfix(throughput.postfix(backend), refresh=False)

    workers = [
        asyncio.create_task(worker())
        for _ in range(min(backend.batches_in_flight(config.conversations_per_chunk), len(batches)))
    ]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    finally:
        await backend.aclose()


def _trimmed(
    directory: Location, kind: str, batch_index: int, rows: int, keep: set[str]
) -> Location:
    """A shard of the last batch holding only the rows the run returns (written once)."""
    path = directory / "trimmed" / f"{kind}-{batch_index:06d}-{rows:03d}.parquet"
    if not path.exists():
        source = _shard(directory, kind, batch_index)
        table = parquet_file(source.path, source.store).read()
        mask = pc.is_in(table["conversation_id"], pa.array(sorted(keep), pa.string()))
        _write_atomically(table.filter(mask), path)
    return path


def _run_files(
    directory: Location, config: SelfStudyConfig
) -> tuple[list[Location], list[Location]]:
    """The shard files of the run's ``num_conversations`` conversations, in order."""
    conversations, targets = [], []
    for batch_index in range(config.num_batches):
        rows = config.rows_kept(batch_index)
        if rows == config.conversations_per_chunk:
            conversations.append(_shard(directory, "conversations", batch_index))
            targets.append(_shard(directory, "targets", batch_index))
            continue
        keep = {f"conv-{batch_index:06d}-{row:03d}" for row in range(rows)}
        conversations.append(_trimmed(directory, "conversations", batch_index, rows, keep))
        targets.append(_trimmed(directory, "targets", batch_index, rows, keep))
    return conversations, targets


def run_self_study(
    study: SelfStudy,
    chunks: Sequence[tuple[str, str]],
    shard_dir: str | os.PathLike,
    backend_id: str,
) -> tuple[ShardedTable, ShardedTable, dict[str, float]]:
    """Run (or resume, or extend) every batch, one shard per batch, and return the tables.

    The tables are lazy handles over the shard files: nothing is read back into memory. A second
    process running the same self-study into the same folder waits for the first, then resumes
    from its shards (no batch is written twice).

    Returns:
        ``conversations``, ``teacher_logprobs`` and totals (conversations, tokens, seconds).
    """
    if not chunks:
        raise ValueError("The chunk set is empty: run document_prep on a non-empty corpus first.")
    config = study.config
    directory = Location.of(shard_dir) / run_key(config, chunks, backend_id)
    lock = directory / LOCK_FILE
    with lock.store.lock(lock.path, on_wait=lambda: _waiting_for(directory)) as held:
        throughput, seconds = _synthesize_missing(study, chunks, directory, held)
        conversation_files, target_files = _run_files(directory, config)
    # One run id in both tables: training refuses conversations and targets of different runs
    # (conversation ids alone repeat from run to run).
    attrs = {RUN_ID: f"{directory.name}-{config.num_conversations}"}
    conversations = _table(*conversation_files)
    targets = _table(*target_files)
    conversations.attrs, targets.attrs = dict(attrs), dict(attrs)
    return conversations, targets, _totals(conversations, targets, throughput, seconds)


def _waiting_for(directory: Location) -> None:
    logger.warning(
        "Another process is running this self-study into %s; waiting for it, then resuming "
        "from its shards.",
        directory,
    )


def _synthesize_missing(
    study: SelfStudy, chunks: Sequence[tuple[str, str]], directory: Location, lock: HeldLock
) -> tuple[_Throughput, float]:
    """Write the batches that ``directory`` lacks; how fast, and in how many seconds."""
    config = study.config
    done = _finished_batches(directory)
    if done:
        done = _intact_batches(directory, done)
    todo = [b for b in range(config.num_batches) if b not in done]
    if done:
        logger.info(
            "Resuming self-study: %d of %d batches already in %s",
            config.num_batches - len(todo),
            config.num_batches,
            directory,
        )
    throughput = _Throughput()
    initial = sum(config.rows_kept(b) for b in range(config.num_batches) if b in done)
    with progress_bar(
        total=config.num_conversations, initial=initial, desc="self-study", unit="conv"
    ) as progress:
        if todo:
            asyncio.run(_synthesize(study, chunks, directory, todo, progress, throughput, lock))
    return throughput, time.perf_counter() - throughput.started


def _totals(
    conversations: ShardedTable, targets: ShardedTable, throughput: _Throughput, seconds: float
) -> dict[str, float]:
    """What the run holds (all of it) and how fast this process wrote its fresh part."""
    summary = conversations.to_pandas(columns=["num_tokens", "answer_truncated"])
    totals = {
        "conversations": float(conversations.num_rows),
        "tokens": float(summary["num_tokens"].sum()),
        "teacher_entries": float(targets.num_rows),
        "truncated_answers": float(summary["answer_truncated"].sum()),
        "conversations_per_s": throughput.conversations / seconds if seconds > 0 else 0.0,
        "tokens_per_s": throughput.tokens / seconds if seconds > 0 else 0.0,
    }
    logger.info(
        "Self-study: %d conversations, %d tokens, %d teacher entries, %d answers cut by the limit",
        *(
            int(totals[k])
            for k in ("conversations", "tokens", "teacher_entries", "truncated_answers")
        ),
    )
    return totals
