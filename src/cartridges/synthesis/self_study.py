"""The two-bot self-study protocol on a local Hugging Face model.

For each batch one chunk is drawn; every conversation of the batch is about it, so the KV of
the system message that carries the chunk is computed once and shared by all rows (the prefix
of :func:`cartridges.generation.generate`). Bot A (the user side) sees the chunk and a seed
prompt and writes one message; bot B (the assistant) sees the chunk and that message and answers
greedily, and the top-k log-probabilities of each answer token become the teacher targets.

What the student later trains on is the conversation *without* the chunk: the tokens that follow
the system message in the teacher's rendering (:func:`cartridges.chat.continuation_ids`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import chat_ids, continuation_ids, shared_prefix_length
from cartridges.generation import Generation, generate
from cartridges.initialization import from_token_ids
from cartridges.synthesis.seed_prompts import sample_seed, seed_registry, validate_weights

logger = logging.getLogger(__name__)


@dataclass
class SelfStudyConfig:
    """Parameters of self-study (``conf/base/parameters_self_study.yml``)."""

    num_conversations: int = 64
    conversations_per_chunk: int = 8  # one batch: all rows share the chunk's prefill
    seed_type_weights: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("structuring", "summarization", "question", "use_case", "creative"), 1.0
        )
    )
    extra_seed_prompts: dict[str, list[str]] = field(default_factory=dict)
    replace_seed_prompts: bool = False
    system_prompt: str = "You are in a conversation about the following information.\n\n{chunk}"
    question_temperature: float = 0.6
    max_question_tokens: int = 64
    max_answer_tokens: int = 128
    top_k: int = 20
    min_prob_mass: float = 0.99
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_conversations < 1:
            raise ValueError(f"num_conversations must be >= 1, got {self.num_conversations}.")
        if self.conversations_per_chunk < 1:
            raise ValueError(
                f"conversations_per_chunk must be >= 1, got {self.conversations_per_chunk}."
            )
        if "{chunk}" not in self.system_prompt:
            raise ValueError("system_prompt must contain '{chunk}' where the chunk text goes.")
        if not 0 < self.min_prob_mass <= 1:
            raise ValueError(f"min_prob_mass must lie in (0, 1], got {self.min_prob_mass}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        validate_weights(self.seed_type_weights, self.registry)

    @property
    def registry(self) -> dict[str, list[str]]:
        return seed_registry(self.extra_seed_prompts, self.replace_seed_prompts)


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


def truncate_to_mass(ids: torch.Tensor, logprobs: torch.Tensor, mass: float) -> tuple[list, list]:
    """Keep the leading top-k entries until their cumulative probability reaches ``mass``."""
    cumulative = logprobs.exp().cumsum(-1)
    keep = int((cumulative < mass).sum()) + 1
    return ids[:keep].tolist(), logprobs[:keep].tolist()


class LocalSelfStudy:
    """Runs self-study with an in-process model."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: SelfStudyConfig
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.registry = config.registry
        self.stop_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _generate_after_shared_prefix(
        self, rows: Sequence[list[int]], **kwargs
    ) -> list[Generation]:
        """Prefill the rows' common prefix once, then decode every row after it."""
        shared = shared_prefix_length(rows)
        prefix = (
            from_token_ids(self.model, rows[0][:shared], num_frozen_tokens=0) if shared else None
        )
        return generate(
            self.model,
            [row[shared:] for row in rows],
            prefix=prefix,
            stop_token_ids=self.stop_ids,
            pad_token_id=self.pad_id,
            **kwargs,
        )

    def _strip(self, generation: Generation) -> str:
        ids = [t for t in generation.token_ids if t not in self.stop_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def run_batch(
        self, batch_index: int, chunk_id: str, chunk_text: str, size: int
    ) -> list[Conversation]:
        """Synthesise ``size`` conversations about one chunk (deterministic per batch index)."""
        config = self.config
        rng = random.Random(f"{config.seed}-{batch_index}")
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        system = config.system_prompt.format(chunk=chunk_text)
        seeds = [sample_seed(rng, config.seed_type_weights, self.registry) for _ in range(size)]

        def conversation(*messages: dict[str, str]) -> list[dict[str, str]]:
            return [{"role": "system", "content": system}, *messages]

        questions = self._generate_after_shared_prefix(
            [
                chat_ids(self.tokenizer, conversation({"role": "user", "content": p}), True)
                for _, p in seeds
            ],
            max_new_tokens=config.max_question_tokens,
            temperature=config.question_temperature,
            generator=generator,
        )
        question_texts = [self._strip(q) for q in questions]
        answers = self._generate_after_shared_prefix(
            [
                chat_ids(self.tokenizer, conversation({"role": "user", "content": q}), True)
                for q in question_texts
            ],
            max_new_tokens=config.max_answer_tokens,
            temperature=0.0,
            top_logprobs=config.top_k,
        )
        results = []
        for row, ((seed_type, seed_prompt), question, answer) in enumerate(
            zip(seeds, question_texts, answers, strict=True)
        ):
            user = {"role": "user", "content": question}
            prompt_ids = continuation_ids(
                self.tokenizer, system, [user], add_generation_prompt=True
            )
            start = len(prompt_ids)
            targets = [
                (start + i, *truncate_to_mass(ids, logprobs, config.min_prob_mass))
                for i, (ids, logprobs) in enumerate(
                    zip(answer.top_ids, answer.top_logprobs, strict=True)
                )
            ]
            results.append(
                Conversation(
                    conversation_id=f"conv-{batch_index:06d}-{row:03d}",
                    chunk_id=chunk_id,
                    seed_type=seed_type,
                    seed_prompt=seed_prompt,
                    messages=[user, {"role": "assistant", "content": self._strip(answer)}],
                    token_ids=prompt_ids + answer.token_ids,
                    answer_start=start,
                    answer_truncated=not answer.stopped,
                    targets=targets,
                )
            )
        return results

    def run(self, chunks: Sequence[tuple[str, str]]) -> Iterator[Conversation]:
        """Yield ``num_conversations`` conversations, cycling through ``chunks`` (seeded order)."""
        if not chunks:
            raise ValueError(
                "The chunk set is empty: run document_prep on a non-empty corpus first."
            )
        config = self.config
        order = list(range(len(chunks)))
        random.Random(config.seed).shuffle(order)
        num_batches = -(-config.num_conversations // config.conversations_per_chunk)
        started, tokens = time.perf_counter(), 0
        with tqdm(total=config.num_conversations, desc="self-study", unit="conv") as progress:
            for batch_index in range(num_batches):
                size = min(
                    config.conversations_per_chunk,
                    config.num_conversations - batch_index * config.conversations_per_chunk,
                )
                chunk_id, text = chunks[order[batch_index % len(order)]]
                for conversation in self.run_batch(batch_index, chunk_id, text, size):
                    tokens += len(conversation.token_ids)
                    yield conversation
                progress.update(size)
                elapsed = time.perf_counter() - started
                progress.set_postfix(tok_per_s=f"{tokens / elapsed:.0f}")
