"""The two-bot self-study protocol, backend-agnostic and resumable.

For each batch one chunk is drawn; every conversation of the batch is about it (so a local
backend prefills the chunk once). Bot A (the user side) sees the chunk and a seed prompt and
writes a message; bot B (the assistant) sees the chunk and the conversation and answers
greedily; the top-k log-probabilities of each answer token become the teacher targets. Several
rounds alternate the two.

What the student later trains on is the conversation *without* the chunk: the tokens that follow
the system message in the teacher's rendering (:func:`cartridges.chat.continuation_ids`), with
the answers' tokens exactly as the teacher produced them.

Thinking models need chat-template switches (Qwen3's ``enable_thinking``): bot B, and so the
student's tokens, render with ``chat_template_kwargs`` (the model's); bot A renders with
``question_chat_template_kwargs`` merged over them, so that its short questions are not spent
on reasoning.

Every batch is a pure function of ``(seed, batch index)``: it always has
``conversations_per_chunk`` rows, even when the run needs fewer of the last one, so a
conversation's content never depends on ``num_conversations``, and raising it extends a finished
run instead of starting over. Running many batches, one shard each, resumably, is
``cartridges.synthesis.runs``'s part.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedTokenizerBase

from cartridges.chat import Message, continuation_ids
from cartridges.checks import Problems
from cartridges.synthesis.backends import Backend, Completion, Sampling, run_blocking
from cartridges.synthesis.seed_prompts import sample_seed, seed_registry, validate_weights

logger = logging.getLogger(__name__)

# Settings that entered the resume identity after runs existed: left out while unset, so that
# those runs keep their key.
_IDENTITY_IF_SET = ("chat_template_kwargs", "question_chat_template_kwargs")


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
    # Chat-template switches of bot B and of the student's tokens (the model's own), and those
    # bot A adds over them, e.g. {enable_thinking: false} for short questions from Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    question_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = Problems()
        problems.at_least(
            self, 1, "num_conversations", "conversations_per_chunk", "rounds", "top_k"
        )
        problems.require(
            "{chunk}" in self.system_prompt,
            "system_prompt must contain '{chunk}' where the chunk text goes.",
        )
        problems.require(
            0 < self.min_prob_mass <= 1,
            f"min_prob_mass must lie in (0, 1], got {self.min_prob_mass}.",
        )
        problems.require(
            0 <= self.cot_probability <= 1,
            f"cot_probability must lie in [0, 1], got {self.cot_probability}.",
        )
        problems.raise_any()
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

    @property
    def question_template_kwargs(self) -> dict[str, Any]:
        """Bot A's chat-template switches: the model's, with the question writer's over them."""
        return {**self.chat_template_kwargs, **self.question_chat_template_kwargs}

    def resume_identity(self) -> dict:
        """The settings that decide the conversations (``num_conversations`` does not)."""
        identity = {k: v for k, v in asdict(self).items() if k != "num_conversations"}
        return {k: v for k, v in identity.items() if v or k not in _IDENTITY_IF_SET}


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
        self,
        batch_index: int,
        chunk_id: str,
        chunk_text: str,
        on_replies: Callable[[int], None] | None = None,
    ) -> list[Conversation]:
        """Synthesise one batch of conversations about a chunk (deterministic per batch index).

        A batch always has ``conversations_per_chunk`` rows, so its content never depends on
        how many conversations the run asks for. ``on_replies(n)`` is told of every ``n``
        questions or answers the backend returns, so that progress moves within a batch.
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
                Sampling(
                    temperature=config.question_temperature,
                    max_tokens=config.max_question_tokens,
                    seed=rng.getrandbits(62),
                    template_kwargs=config.question_template_kwargs,
                ),
            )
            if on_replies is not None:
                on_replies(len(questions))
            for i, question in zip(active, questions, strict=True):
                messages[i].append({"role": "user", "content": question.text})
            replies = await self.backend.acomplete(
                system,
                [self._teacher_view(messages[i], cot[i]) for i in active],
                Sampling(
                    temperature=0.0,
                    max_tokens=config.max_answer_tokens,
                    top_logprobs=config.top_k,
                    seed=rng.getrandbits(62),
                    template_kwargs=config.chat_template_kwargs,
                ),
            )
            if on_replies is not None:
                on_replies(len(replies))
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
        if not self.config.truncate_chunks or self.backend.max_length is None:
            return chunk_text
        limit = self.backend.max_length
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

    def _student_ids(
        self, system: str, messages: list[Message], add_generation_prompt: bool = False
    ) -> list[int]:
        """The model's rendering of ``messages`` after the system message: the student's tokens."""
        if not messages:
            return []
        switches = self.config.chat_template_kwargs
        return continuation_ids(self.tokenizer, system, messages, add_generation_prompt, switches)

    def _conversation(
        self, conversation_id, chunk_id, system, seed, messages, answers
    ) -> Conversation:
        """The student's token ids: template segments between the teacher's exact answer ids."""
        token_ids: list[int] = []
        positions, ids, logprobs = [], [], []
        answer_start = 0
        before: list[int] = []  # the rendering of the rounds so far
        for round_index, answer in enumerate(answers):
            upto = self._student_ids(system, messages[: 2 * round_index + 1], True)
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
            if round_index + 1 < len(answers):
                before = self._student_ids(system, messages[: 2 * round_index + 2])
                token_ids += _after_last(before, answer.token_ids[-1])
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


def _after_last(rendered: list[int], end: int) -> list[int]:
    """What ``rendered`` holds after its last ``end`` token: the text a chat template writes
    after a reply's end of turn (ChatML's newline after ``<|im_end|>``), which the teacher reads
    before the next question. Nothing when the template does not write ``end`` there."""
    if end not in rendered:
        return []
    return rendered[len(rendered) - rendered[::-1].index(end) :]
