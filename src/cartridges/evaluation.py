"""Compare ways of giving a model its corpus: in context, not at all, truncated, or as cartridges.

Every method is a KV prefix (or none) followed by the same question tokens, so the comparison
differs only in what the prefix holds and how many bytes it takes.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge
from cartridges.chat import chat_ids, context_ids, continuation_ids
from cartridges.generation import generate
from cartridges.initialization import from_token_ids
from cartridges.prefix import forward_with_prefix

logger = logging.getLogger(__name__)


@dataclass
class Method:
    """A way to answer: a KV prefix (``None``: no context) and how the question follows it."""

    name: str
    prefix: Cartridge | None
    note: str = ""

    @property
    def num_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def kv_bytes(self) -> int:
        return self.prefix.kv_bytes if self.prefix is not None else 0


@dataclass
class Question:
    question: str
    answer: str


def build_methods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus_text: str,
    system_prompt: str,
    cartridges: dict[str, Cartridge],
    max_context_tokens: int | None = None,
) -> list[Method]:
    """ICL, no context, and for each cartridge the cartridge and ICL truncated to its size."""
    context = context_ids(tokenizer, system_prompt.format(chunk=corpus_text))
    limit = max_context_tokens or getattr(model.config, "max_position_embeddings", None)
    note = ""
    if limit is not None and len(context) > limit // 2:
        keep = limit // 2  # leave room for the question and the answer
        note = f"context truncated from {len(context)} to {keep} tokens to fit the model"
        logger.warning("ICL: %s", note)
        context = context[:keep]
    methods = [
        Method("icl", from_token_ids(model, context, num_frozen_tokens=0), note),
        Method("no_context", None),
    ]
    for name, cartridge in cartridges.items():
        cartridge.check_compatible(model)
        p = cartridge.num_tokens
        methods.append(Method(name, cartridge))
        truncated = f"truncated_icl_p{p}"
        if all(m.name != truncated for m in methods):
            methods.append(
                Method(truncated, from_token_ids(model, context[:p], num_frozen_tokens=0))
            )
    return methods


def question_ids(
    tokenizer: PreTrainedTokenizerBase, method: Method, system_text: str, messages
) -> list[int]:
    """The tokens that follow the method's prefix: the chat continuation, or a fresh chat."""
    if method.prefix is None:
        return chat_ids(tokenizer, messages, add_generation_prompt=True)
    return continuation_ids(tokenizer, system_text, messages, add_generation_prompt=True)


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers of ``method`` to each question."""
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        prompts = [
            question_ids(tokenizer, method, system_text, [{"role": "user", "content": q.question}])
            for q in batch
        ]
        generations = generate(
            model,
            prompts,
            prefix=method.prefix,
            max_new_tokens=max_new_tokens,
            stop_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        answers += [
            tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in generations
        ]
    return answers


@torch.no_grad()
def answer_log_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
) -> float:
    """Mean negative log-likelihood per token of the reference answers (teacher forcing)."""
    total, count = 0.0, 0
    for q in questions:
        user = {"role": "user", "content": q.question}
        prompt = question_ids(tokenizer, method, system_text, [user])
        full = question_ids(
            tokenizer, method, system_text, [user, {"role": "assistant", "content": q.answer}]
        )
        # The full rendering ends with the answer turn; drop any generation prompt appended.
        full = full[: len(full) - _generation_suffix(tokenizer)]
        ids = torch.tensor([full], device=model.device)
        cache = method.prefix.as_cache(1, model.config) if method.prefix is not None else None
        logits = forward_with_prefix(model, cache, ids, use_cache=False).logits[0]
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)
        targets = ids[0, len(prompt) :]
        total -= logprobs.gather(-1, targets[:, None]).sum().item()
        count += len(targets)
    return total / max(count, 1)


def _generation_suffix(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens ``add_generation_prompt`` appends after a finished turn."""
    messages = [{"role": "user", "content": "x"}]
    return len(chat_ids(tokenizer, messages, True)) - len(chat_ids(tokenizer, messages, False))


# --------------------------------------------------------------------------- scoring
def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation, articles and extra whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
