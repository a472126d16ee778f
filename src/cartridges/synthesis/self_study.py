"""The two-bot self-study protocol, backend-agnostic and resumable.

For each batch one chunk is drawn; every conversation of the batch is about it (so a local
backend prefills the chunk once). Bot A (the user side) sees the chunk and a seed prompt and
writes a message; bot B (the assistant) sees the chunk and the conversation and answers
greedily; the top-k log-probabilities of each answer token become the teacher targets. Several
rounds alternate the two.

What the student later trains on is the conversation *without* the chunk: the tokens that follow
the system message in the teacher's rendering (:func:`cartridges.chat.continuation_ids`), with
the answers' tokens exactly as the teacher produced them.

Every batch is a pure function of ``(seed, batch index)``: it always has
``conversations_per_chunk`` rows, even when the run needs fewer of the last one, so a
conversation's content never depends on ``num_conversations``, and raising it extends a finished
run instead of starting over. Many batches run at once when the backend can serve them (a fleet
of servers); each is written to its own shard as soon as it completes, in whatever order they
complete, so a run killed at any point (even ``kill -9``) and restarted runs only the missing
batches and produces the same conversations, none lost and none twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedTokenizerBase

from cartridges.chat import Message, continuation_ids
from cartridges.files import atomic_write
from cartridges.lineage import RUN_ID
from cartridges.progress import progress_bar
from cartridges.synthesis.backends import Backend, BackendError, Completion, run_blocking
from cartridges.synthesis.seed_prompts import sample_seed, seed_registry, validate_weights
from cartridges.tables import ShardedTable

logger = logging.getLogger(__name__)

ROW_GROUP_SIZE = 65_536  # rows of teacher targets per parquet row group (a few conversations)


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class SelfStudyConfig:
    """Parameters of self-study (``conf/base/parameters_self_study.yml``)."""

    num_conversations: int = 64
    conversations_per_chunk: int = 8  # one batch: all rows share the chunk
    rounds: int = 1  # user/assistant exchanges per conversation (the paper uses 1)
    seed_type_weights: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("structuring", "summarization", "question", "use_case", "creative"), 1.0
        )
    )
    extra_seed_prompts: dict[str, list[str]] | None = field(default_factory=dict)
    replace_seed_prompts: bool = False
    system_prompt: str = "You are in a conversation about the following information.\n\n{chunk}"
    truncate_chunks: bool = False  # cut chunks that do not fit the context instead of failing
    cot_probability: float = 0.0  # chance that bot B is asked to reason before answering
    cot_instruction: str = "Think step by step before giving your final answer."
    question_temperature: float = 0.6
    max_question_tokens: int = 64
    max_answer_tokens: int = 128
    top_k: int = 20
    min_prob_mass: float = 0.99
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_conversations", "conversations_per_chunk", "rounds", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if "{chunk}" not in self.system_prompt:
            raise ValueError("system_prompt must contain '{chunk}' where the chunk text goes.")
        if not 0 < self.min_prob_mass <= 1:
            raise ValueError(f"min_prob_mass must lie in (0, 1], got {self.min_prob_mass}.")
        if not 0 <= self.cot_probability <= 1:
            raise ValueError(f"cot_probability must lie in [0, 1], got {self.cot_probability}.")
        validate_weights(self.seed_type_weights, self.registry)

    @property
    def registry(self) -> dict[str, list[str]]:
        return seed_registry(self.extra_seed_prompts, self.replace_seed_prompts)

    @property
    def num_batches(self) -> int:
        return -(-self.num_conversations // self.conversations_per_chunk)

    def rows_kept(self, batch_index: int) -> int:
        """Rows of a batch that the run returns (the last batch may keep fewer than it has)."""
        done = batch_index * self.conversations_per_chunk
        return min(self.conversations_per_chunk, self.num_conversations - done)

    def resume_identity(self) -> dict:
        """The settings that decide the conversations (``num_conversations`` does not)."""
        return {k: v for k, v in asdict(self).items() if k != "num_conversations"}


class Targets:
    """A conversation's teacher targets, flat: one entry per kept top-k token.

    ``position[i]`` indexes the conversation's ``token_ids``; ``token_id[i]`` and ``logprob[i]``
    are one entry of the teacher's distribution over that token. Iterating yields
    ``(position, ids, logprobs)`` per distilled position.
    """

    def __init__(self, position: np.ndarray, token_id: np.ndarray, logprob: np.ndarray) -> None:
        self.position = np.asarray(position, dtype=np.int32)
        self.token_id = np.asarray(token_id, dtype=np.int32)
        self.logprob = np.asarray(logprob, dtype=np.float32)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, Sequence[int], Sequence[float]]]) -> Targets:
        """From ``(position, ids, logprobs)`` rows."""
        counts = [len(ids) for _, ids, _ in rows]
        return cls(
            np.repeat([position for position, _, _ in rows], counts).astype(np.int32),
            np.concatenate([np.asarray(ids) for _, ids, _ in rows] or [np.zeros(0)]),
            np.concatenate([np.asarray(values) for _, _, values in rows] or [np.zeros(0)]),
        )

    def __len__(self) -> int:
        return len(self.position)

    def __iter__(self) -> Iterator[tuple[int, list[int], list[float]]]:
        starts = np.flatnonzero(np.diff(self.position, prepend=-1)).tolist() + [len(self)]
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            yield (
                int(self.position[start]),
                self.token_id[start:end].tolist(),
                self.logprob[start:end].tolist(),
            )


@dataclass
class Conversation:
    """One synthetic conversation and its teacher targets.

    ``token_ids`` are the student's tokens (the conversation without the chunk); the teacher
    targets are the teacher's top-k distribution over ``token_ids[position]`` at each distilled
    position (``Targets``, or ``(position, ids, logprobs)`` rows).
    """

    conversation_id: str
    chunk_id: str
    seed_type: str
    seed_prompt: str
    messages: list[dict[str, str]]
    token_ids: list[int]
    answer_start: int
    answer_truncated: bool
    targets: Targets

    def __post_init__(self) -> None:
        if not isinstance(self.targets, Targets):
            self.targets = Targets.from_rows(self.targets)


def truncate_to_mass(ids, logprobs, mass: float) -> tuple[list, list]:
    """Keep the leading top-k entries until their cumulative probability reaches ``mass``."""
    keep = mass_cut(np.asarray(logprobs, dtype=np.float32)[None], mass)[0]
    return list(ids)[:keep], list(logprobs)[:keep]


def mass_cut(logprobs: np.ndarray, mass: float) -> np.ndarray:
    """Per row of ``[T, K]`` sorted log-probabilities, how many leading entries to keep.

    Entries are kept until their cumulative probability reaches ``mass``; padding (``-inf``)
    is never kept.
    """
    cumulative = np.exp(logprobs.astype(np.float64)).cumsum(-1)
    keep = (cumulative < mass).sum(-1) + 1
    return np.minimum(keep, np.isfinite(logprobs).sum(-1))


def _flip(messages: Sequence[Message]) -> list[Message]:
    """Bot A's view of a conversation: its own messages are the assistant's."""
    swap = {"user": "assistant", "assistant": "user"}
    return [{"role": swap[m["role"]], "content": m["content"]} for m in messages]


class SelfStudy:
    """Runs self-study batches with any backend; the tokenizer renders the student's tokens."""

    def __init__(
        self, backend: Backend, tokenizer: PreTrainedTokenizerBase, config: SelfStudyConfig
    ) -> None:
        self.backend, self.tokenizer, self.config = backend, tokenizer, config
        self.registry = config.registry

    def run_batch(self, batch_index: int, chunk_id: str, chunk_text: str) -> list[Conversation]:
        """Blocking form of :meth:`arun_batch`."""
        return run_blocking(self.backend, self.arun_batch(batch_index, chunk_id, chunk_text))

    async def arun_batch(
        self, batch_index: int, chunk_id: str, chunk_text: str
    ) -> list[Conversation]:
        """Synthesise one batch of conversations about a chunk (deterministic per batch index).

        A batch always has ``conversations_per_chunk`` rows, so its content never depends on
        how many conversations the run asks for.
        """
        config = self.config
        size = config.conversations_per_chunk
        rng = random.Random(f"{config.seed}-{batch_index}")
        system = config.system_prompt.format(chunk=self._fit(chunk_text))
        seeds = [sample_seed(rng, config.seed_type_weights, self.registry) for _ in range(size)]
        cot = [rng.random() < config.cot_probability for _ in range(size)]
        messages: list[list[Message]] = [[] for _ in range(size)]
        answers: list[list[Completion]] = [[] for _ in range(size)]
        active = list(range(size))
        for _ in range(config.rounds):
            questions = await self.backend.acomplete(
                system,
                [[{"role": "user", "content": seeds[i][1]}, *_flip(messages[i])] for i in active],
                temperature=config.question_temperature,
                max_tokens=config.max_question_tokens,
                seed=rng.getrandbits(62),
            )
            for i, question in zip(active, questions, strict=True):
                messages[i].append({"role": "user", "content": question.text})
            replies = await self.backend.acomplete(
                system,
                [self._teacher_view(messages[i], cot[i]) for i in active],
                temperature=0.0,
                max_tokens=config.max_answer_tokens,
                top_logprobs=config.top_k,
                seed=rng.getrandbits(62),
            )
            for i, reply in zip(active, replies, strict=True):
                messages[i].append({"role": "assistant", "content": reply.text})
                answers[i].append(reply)
            # A reply cut by the token limit ends its conversation: it has no end-of-turn.
            active = [i for i in active if answers[i][-1].stopped]
            if not active:
                break
        return [
            self._conversation(
                f"conv-{batch_index:06d}-{row:03d}",
                chunk_id,
                system,
                seeds[row],
                messages[row],
                answers[row],
            )
            for row in range(size)
        ]

    def _fit(self, chunk_text: str) -> str:
        """The chunk, cut to leave room for the conversation when truncation is allowed."""
        limit = getattr(self.backend, "max_length", None)
        if not self.config.truncate_chunks or limit is None:
            return chunk_text
        config = self.config
        room = limit - config.rounds * (config.max_question_tokens + config.max_answer_tokens)
        longest_seed = max(
            len(self.tokenizer(p)["input_ids"])
            for prompts in self.registry.values()
            for p in prompts
        )
        template = len(self.tokenizer(config.system_prompt.format(chunk=""))["input_ids"])
        room -= longest_seed + template + 16 * (2 * config.rounds + 2)  # role markers and slack
        ids = self.tokenizer(chunk_text, add_special_tokens=False)["input_ids"]
        if len(ids) <= room:
            return chunk_text
        logger.warning("Truncating a chunk of %d tokens to %d to fit the context", len(ids), room)
        return self.tokenizer.decode(ids[: max(room, 1)])

    def _teacher_view(self, messages: list[Message], cot: bool) -> list[Message]:
        if not cot:
            return messages
        last = messages[-1]
        instructed = {
            "role": "user",
            "content": f"{last['content']}\n\n{self.config.cot_instruction}",
        }
        return [*messages[:-1], instructed]

    def _conversation(
        self, conversation_id, chunk_id, system, seed, messages, answers
    ) -> Conversation:
        """The student's token ids: template segments between the teacher's exact answer ids."""
        token_ids: list[int] = []
        positions, ids, logprobs = [], [], []
        answer_start = 0
        for round_index, answer in enumerate(answers):
            history = messages[: 2 * round_index]
            before = continuation_ids(self.tokenizer, system, history) if history else []
            upto = continuation_ids(self.tokenizer, system, messages[: 2 * round_index + 1], True)
            if upto[: len(before)] != before:
                raise ValueError("The chat template renders earlier turns differently later on.")
            token_ids += upto[len(before) :]
            if round_index == 0:
                answer_start = len(token_ids)
            if len(answer.top_ids):
                # Keep each position's leading entries up to min_prob_mass, flat.
                keep = mass_cut(answer.top_logprobs, self.config.min_prob_mass)
                kept = np.arange(answer.top_ids.shape[1])[None, :] < keep[:, None]
                offsets = len(token_ids) + np.arange(len(keep), dtype=np.int32)
                positions.append(np.repeat(offsets, keep))
                ids.append(answer.top_ids[kept])
                logprobs.append(answer.top_logprobs[kept])
            token_ids += answer.token_ids
        empty = [np.zeros(0, dtype=np.int32)]
        return Conversation(
            conversation_id=conversation_id,
            chunk_id=chunk_id,
            seed_type=seed[0],
            seed_prompt=seed[1],
            messages=messages[: 2 * len(answers)],
            token_ids=token_ids,
            answer_start=answer_start,
            answer_truncated=not answers[-1].stopped,
            targets=Targets(
                np.concatenate(positions or empty),
                np.concatenate(ids or empty),
                np.concatenate(logprobs or [np.zeros(0, dtype=np.float32)]),
            ),
        )


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
def run_key(config: SelfStudyConfig, chunks: Sequence[tuple[str, str]], backend_id: str) -> str:
    """Identifies a run: shards are reused only by a run with the same inputs and settings.

    ``num_conversations`` is left out: a batch's content does not depend on it, so a larger
    run reuses (extends) a smaller one's shards.
    """
    digest = hashlib.sha256(json.dumps(config.resume_identity(), sort_keys=True).encode())
    digest.update(backend_id.encode())
    for chunk_id, text in chunks:
        digest.update(f"{chunk_id}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def _shard(directory: Path, kind: str, batch_index: int) -> Path:
    return directory / f"{kind}-{batch_index:06d}.parquet"


def _write_atomically(table: pa.Table, path: Path) -> None:
    # Bounded row groups: training reads one conversation's targets by decoding its row group.
    with atomic_write(path) as temporary:
        pq.write_table(table, temporary, row_group_size=ROW_GROUP_SIZE)


def _write_batch(directory: Path, batch_index: int, conversations: list[Conversation]) -> None:
    conversations_table, targets_table = conversation_tables(conversations)
    # The targets shard first: a conversations shard marks the batch complete.
    _write_atomically(targets_table, _shard(directory, "targets", batch_index))
    _write_atomically(conversations_table, _shard(directory, "conversations", batch_index))


def _finished_batches(directory: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in directory.glob("conversations-*.parquet")}


@dataclass
class _Throughput:
    """What the progress bar and the totals report about this run's fresh work."""

    started: float = field(default_factory=time.perf_counter)
    conversations: int = 0
    tokens: int = 0

    def postfix(self, backend: Backend) -> dict[str, str]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {
            "in_flight": str(backend.requests_in_flight),
            "conv_per_s": f"{self.conversations / seconds:.1f}",
            "tok_per_s": f"{self.tokens / seconds:.0f}",
        }


async def _synthesize(
    study: SelfStudy,
    chunks: Sequence[tuple[str, str]],
    directory: Path,
    batches: Sequence[int],
    progress,
    throughput: _Throughput,
) -> None:
    """Run ``batches`` with as many in flight as the backend serves; write each as it ends."""
    config, backend = study.config, study.backend
    order = list(range(len(chunks)))
    random.Random(config.seed).shuffle(order)
    pending = iter(batches)

    async def worker() -> None:
        for batch_index in pending:  # shared: each worker takes the next batch when free
            chunk_id, text = chunks[order[batch_index % len(order)]]
            try:
                conversations = await study.arun_batch(batch_index, chunk_id, text)
            except BackendError as error:
                raise BackendError(
                    f"Self-study batch {batch_index} (chunk {chunk_id}) failed: {error} "
                    f"Finished batches are kept in {directory}; rerun to resume."
                ) from error
            await asyncio.to_thread(_write_batch, directory, batch_index, conversations)
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


def _trimmed(directory: Path, kind: str, batch_index: int, rows: int, keep: set[str]) -> Path:
    """A shard of the last batch holding only the rows the run returns (written once)."""
    path = directory / "trimmed" / f"{kind}-{batch_index:06d}-{rows:03d}.parquet"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        table = pq.read_table(_shard(directory, kind, batch_index))
        mask = pc.is_in(table["conversation_id"], pa.array(sorted(keep), pa.string()))
        _write_atomically(table.filter(mask), path)
    return path


def _run_files(directory: Path, config: SelfStudyConfig) -> tuple[list[Path], list[Path]]:
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

    The tables are lazy handles over the shard files: nothing is read back into memory.

    Returns:
        ``conversations``, ``teacher_logprobs`` and totals (conversations, tokens, seconds).
    """
    if not chunks:
        raise ValueError("The chunk set is empty: run document_prep on a non-empty corpus first.")
    config = study.config
    directory = Path(shard_dir) / run_key(config, chunks, backend_id)
    directory.mkdir(parents=True, exist_ok=True)
    done = _finished_batches(directory)
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
            asyncio.run(_synthesize(study, chunks, directory, todo, progress, throughput))
    seconds = time.perf_counter() - throughput.started
    conversation_files, target_files = _run_files(directory, config)
    # One run id in both tables: training refuses conversations and targets of different runs
    # (conversation ids alone repeat from run to run).
    attrs = {RUN_ID: f"{directory.name}-{config.num_conversations}"}
    conversations = ShardedTable(conversation_files, attrs=attrs)
    targets = ShardedTable(target_files, attrs=attrs)
    summary = conversations.to_pandas(columns=["num_tokens", "answer_truncated"])
    totals = {
        "conversations": float(conversations.num_rows),
        "tokens": float(summary["num_tokens"].sum()),
        "teacher_entries": float(targets.num_rows),
        "truncated_answers": float(summary["answer_truncated"].sum()),
        "conversations_per_s": throughput.conversations / seconds if seconds > 0 else 0.0,
        "tokens_per_s": throughput.tokens / seconds if seconds > 0 else 0.0,
    }
    return conversations, targets, totals
