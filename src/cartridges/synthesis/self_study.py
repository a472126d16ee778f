"""The two-bot self-study protocol, backend-agnostic and resumable.

For each batch one chunk is drawn; every conversation of the batch is about it (so a local
backend prefills the chunk once). Bot A (the user side) sees the chunk and a seed prompt and
writes a message; bot B (the assistant) sees the chunk and the conversation and answers
greedily; the top-k log-probabilities of each answer token become the teacher targets. Several
rounds alternate the two.

What the student later trains on is the conversation *without* the chunk: the tokens that follow
the system message in the teacher's rendering (:func:`cartridges.chat.continuation_ids`), with
the answers' tokens exactly as the teacher produced them.

Every batch is a pure function of ``(seed, batch index)`` and is written to its own shard as soon
as it is done, so a run killed at any point and restarted continues with the first missing batch
and produces the same conversations, none lost and none twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from cartridges.chat import Message, continuation_ids
from cartridges.progress import progress_bar
from cartridges.synthesis.backends import Backend, Completion
from cartridges.synthesis.seed_prompts import sample_seed, seed_registry, validate_weights
from cartridges.targets import to_tables

logger = logging.getLogger(__name__)


@dataclass
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
    extra_seed_prompts: dict[str, list[str]] = field(default_factory=dict)
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

    def batch_size(self, batch_index: int) -> int:
        done = batch_index * self.conversations_per_chunk
        return min(self.conversations_per_chunk, self.num_conversations - done)


@dataclass
class Conversation:
    """One synthetic conversation and its teacher targets.

    ``token_ids`` are the student's tokens (the conversation without the chunk); each teacher
    target ``(position, token_ids, logprobs)`` is the teacher's top-k distribution over the
    token at ``token_ids[position]``.
    """

    conversation_id: str
    chunk_id: str
    seed_type: str
    seed_prompt: str
    messages: list[dict[str, str]]
    token_ids: list[int]
    answer_start: int
    answer_truncated: bool
    targets: list[tuple[int, list[int], list[float]]]


def truncate_to_mass(ids, logprobs, mass: float) -> tuple[list, list]:
    """Keep the leading top-k entries until their cumulative probability reaches ``mass``."""
    ids, logprobs = torch.as_tensor(ids), torch.as_tensor(logprobs)
    cumulative = logprobs.exp().cumsum(-1)
    keep = int((cumulative < mass).sum()) + 1
    return ids[:keep].tolist(), logprobs[:keep].tolist()


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
        """Synthesise one batch of conversations about a chunk (deterministic per batch index)."""
        config = self.config
        size = config.batch_size(batch_index)
        rng = random.Random(f"{config.seed}-{batch_index}")
        system = config.system_prompt.format(chunk=self._fit(chunk_text))
        seeds = [sample_seed(rng, config.seed_type_weights, self.registry) for _ in range(size)]
        cot = [rng.random() < config.cot_probability for _ in range(size)]
        messages: list[list[Message]] = [[] for _ in range(size)]
        answers: list[list[Completion]] = [[] for _ in range(size)]
        active = list(range(size))
        for _ in range(config.rounds):
            questions = self.backend.complete(
                system,
                [[{"role": "user", "content": seeds[i][1]}, *_flip(messages[i])] for i in active],
                temperature=config.question_temperature,
                max_tokens=config.max_question_tokens,
                seed=rng.getrandbits(62),
            )
            for i, question in zip(active, questions, strict=True):
                messages[i].append({"role": "user", "content": question.text})
            replies = self.backend.complete(
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
        targets = []
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
            for offset, (ids, logprobs) in enumerate(
                zip(answer.top_ids, answer.top_logprobs, strict=True)
            ):
                targets.append(
                    (
                        len(token_ids) + offset,
                        *truncate_to_mass(ids, logprobs, self.config.min_prob_mass),
                    )
                )
            token_ids += answer.token_ids
        return Conversation(
            conversation_id=conversation_id,
            chunk_id=chunk_id,
            seed_type=seed[0],
            seed_prompt=seed[1],
            messages=messages[: 2 * len(answers)],
            token_ids=token_ids,
            answer_start=answer_start,
            answer_truncated=not answers[-1].stopped,
            targets=targets,
        )


# --------------------------------------------------------------------------- resumable runs
def run_key(config: SelfStudyConfig, chunks: Sequence[tuple[str, str]], backend_id: str) -> str:
    """Identifies a run: shards are reused only by a run with the same inputs and settings."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(backend_id.encode())
    for chunk_id, text in chunks:
        digest.update(f"{chunk_id}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def _write_atomically(table: pd.DataFrame, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    table.to_parquet(temporary, index=False)
    os.replace(temporary, path)


def run_self_study(
    study: SelfStudy,
    chunks: Sequence[tuple[str, str]],
    shard_dir: str | os.PathLike,
    backend_id: str,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Run (or resume) every batch, one shard per batch, and return the concatenated tables.

    Returns:
        ``conversations``, ``teacher_logprobs`` and totals (conversations, tokens, seconds).
    """
    if not chunks:
        raise ValueError("The chunk set is empty: run document_prep on a non-empty corpus first.")
    config = study.config
    directory = Path(shard_dir) / run_key(config, chunks, backend_id)
    directory.mkdir(parents=True, exist_ok=True)
    order = list(range(len(chunks)))
    random.Random(config.seed).shuffle(order)
    done = {int(p.stem.split("-")[1]) for p in directory.glob("conversations-*.parquet")}
    if done:
        logger.info(
            "Resuming self-study: %d of %d batches already in %s",
            len(done),
            config.num_batches,
            directory,
        )
    started, tokens, fresh = time.perf_counter(), 0, 0
    total = config.num_conversations
    initial = sum(config.batch_size(b) for b in done)
    with progress_bar(total=total, initial=initial, desc="self-study", unit="conv") as progress:
        for batch_index in range(config.num_batches):
            if batch_index in done:
                continue
            chunk_id, text = chunks[order[batch_index % len(order)]]
            conversations, targets = to_tables(study.run_batch(batch_index, chunk_id, text))
            # The targets shard first: a conversations shard marks the batch complete.
            _write_atomically(targets, directory / f"targets-{batch_index:06d}.parquet")
            _write_atomically(conversations, directory / f"conversations-{batch_index:06d}.parquet")
            tokens += int(conversations["num_tokens"].sum())
            fresh += len(conversations)
            progress.update(len(conversations))
            progress.set_postfix(
                tok_per_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False
            )
    seconds = time.perf_counter() - started
    conversations = pd.concat(
        [
            pd.read_parquet(directory / f"conversations-{b:06d}.parquet")
            for b in range(config.num_batches)
        ],
        ignore_index=True,
    )
    targets = pd.concat(
        [
            pd.read_parquet(directory / f"targets-{b:06d}.parquet")
            for b in range(config.num_batches)
        ],
        ignore_index=True,
    )
    totals = {
        "conversations": float(len(conversations)),
        "tokens": float(conversations["num_tokens"].sum()),
        "teacher_entries": float(len(targets)),
        "truncated_answers": float(conversations["answer_truncated"].sum()),
        "conversations_per_s": fresh / seconds if seconds > 0 else 0.0,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
    return conversations, targets, totals
