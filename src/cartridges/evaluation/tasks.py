"""The evaluation tasks, run for one method (a KV prefix) at a time.

* answers: greedy generation, scored by :mod:`cartridges.evaluation.scoring` (QA, multiple
  choice, chrF);
* log-perplexity of the reference answers under teacher forcing;
* fidelity: the full-vocabulary KL from the ICL teacher to the method at the assistant tokens of
  held-out synthetic conversations, which is what distillation minimises.

A method's question tokens follow the chat convention of the project: after a prefix they are
``continuation_ids(system_text, messages)`` (the prefix stands in for the system message that
carries the corpus); with no prefix they are a fresh chat.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import Message, chat_ids, continuation_ids
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question, prompt_text
from cartridges.generation import generate
from cartridges.prefix import forward_with_prefix, head_only_at
from cartridges.tables import ShardedTable

logger = logging.getLogger(__name__)


def question_ids(
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    system_text: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
) -> list[int]:
    """The tokens that follow the method's prefix: the chat continuation, or a fresh chat."""
    if method.prefix is None:
        return chat_ids(tokenizer, messages, add_generation_prompt)
    return continuation_ids(tokenizer, system_text, messages, add_generation_prompt)


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers of ``method`` to each question (options listed for multiple choice)."""
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            question_ids(tokenizer, method, system_text, [_user(q)])
            for q in questions[start : start + batch_size]
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
    suffix = _generation_suffix(tokenizer)
    for q in questions:
        user = _user(q)
        prompt = question_ids(tokenizer, method, system_text, [user])
        full = question_ids(
            tokenizer, method, system_text, [user, {"role": "assistant", "content": q.answer}]
        )
        # The full rendering ends with the answer turn; drop any generation prompt appended.
        full = full[: len(full) - suffix]
        logprobs = _logprobs(model, method, full, range(len(prompt), len(full)))
        targets = torch.tensor(full[len(prompt) :], device=logprobs.device)
        total -= logprobs.gather(-1, targets[:, None]).sum().item()
        count += len(targets)
    return total / max(count, 1)


def _user(question: Question) -> Message:
    return {"role": "user", "content": prompt_text(question)}


def _generation_suffix(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens ``add_generation_prompt`` appends after a finished turn."""
    messages = [{"role": "user", "content": "x"}]
    return len(chat_ids(tokenizer, messages, True)) - len(chat_ids(tokenizer, messages, False))


def _logprobs(
    model: PreTrainedModel, method: Method, token_ids: Sequence[int], positions: Iterable[int]
) -> torch.Tensor:
    """``[N, V]`` float32 log-probabilities of the tokens at ``positions``, after the prefix."""
    ids = torch.tensor([list(token_ids)], device=model.device)
    cache = method.prefix.as_cache(1, model.config) if method.prefix is not None else None
    columns = torch.tensor([p - 1 for p in positions], device=model.device)  # i-1 predicts i
    with head_only_at(model, torch.zeros_like(columns), columns):
        logits = forward_with_prefix(model, cache, ids, use_cache=False).logits[0]  # [N, V]
    return torch.log_softmax(logits.float(), dim=-1)


# --------------------------------------------------------------------------- fidelity
@dataclass
class HeldOutConversation:
    """A synthetic conversation the cartridges were not trained on.

    Attributes:
        conversation_id: its id in the ``conversations`` table.
        messages: the turns, for rendering without a system message (no context).
        token_ids: the tokens after the system message (the student's view).
        positions: indices into ``token_ids`` of the assistant's tokens.
    """

    conversation_id: str
    messages: list[Message]
    token_ids: list[int]
    positions: list[int]


def held_out_conversations(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    ids: Sequence[str] | None,
    limit: int,
) -> list[HeldOutConversation]:
    """The first ``limit`` conversations among ``ids`` (``None``: all), with assistant positions.

    The assistant positions are where self-study recorded teacher targets: exactly the answer
    tokens, whatever the chat template looks like. Tables on disk are scanned for the wanted
    rows only, so memory holds the ``limit`` conversations, never the whole tables.
    """
    table = _first_conversations(conversations, ids, limit)
    wanted = set(table["conversation_id"])
    if isinstance(teacher_logprobs, ShardedTable):
        targets = teacher_logprobs.filter_rows(
            "conversation_id", sorted(wanted), ["conversation_id", "position"]
        )
    else:
        targets = teacher_logprobs[teacher_logprobs["conversation_id"].isin(wanted)]
    positions = {
        cid: sorted(set(group["position"].tolist()))
        for cid, group in targets.groupby("conversation_id", sort=False)
    }
    return [
        HeldOutConversation(
            str(row.conversation_id),
            json.loads(row.messages),
            [int(t) for t in row.token_ids],
            positions[row.conversation_id],
        )
        for row in table.itertuples(index=False)
        if positions.get(row.conversation_id)
    ]


def _first_conversations(
    conversations: pd.DataFrame | ShardedTable, ids: Sequence[str] | None, limit: int
) -> pd.DataFrame:
    """The first ``limit`` rows among ``ids`` (``None``: any), in table order."""
    if not isinstance(conversations, ShardedTable):
        if ids is not None:
            conversations = conversations[conversations["conversation_id"].isin(set(ids))]
        return conversations.head(limit)
    if ids is not None:
        return conversations.filter_rows("conversation_id", sorted(set(ids))).head(limit)
    batches, count = [], 0
    for batch in conversations.iter_batches(batch_size=max(limit, 1)):
        if count >= limit:
            break
        batches.append(batch.slice(0, limit - count))
        count += len(batches[-1])
    if not batches:
        return conversations.schema.empty_table().to_pandas()
    return pa.Table.from_batches(batches).to_pandas()


@torch.no_grad()
def fidelity_kl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: Method,
    methods: Sequence[Method],
    conversations: Sequence[HeldOutConversation],
    system_text: str,
) -> dict[str, float]:
    """Mean KL(teacher || method) per assistant token, over the full vocabulary.

    The teacher is ICL (the whole corpus in context). A method without prefix sees the same
    tokens after the opening a chat without system message has; ``nan`` when the template
    renders the turns differently then, so that no position can be matched.
    """
    totals = dict.fromkeys((m.name for m in methods), 0.0)
    count = 0
    opening = _no_context_opening(tokenizer, system_text)
    if opening is None and any(m.prefix is None for m in methods):
        logger.warning("Fidelity of no_context skipped: its template renders turns differently.")
    for conversation in conversations:
        ids, positions = conversation.token_ids, conversation.positions
        reference = _logprobs(model, teacher, ids, positions)  # [N, V]
        for method in methods:
            if method.prefix is None and opening is None:
                totals[method.name] = math.nan
                continue
            if method.prefix is None:
                shifted = [p + len(opening) for p in positions]
                student = _logprobs(model, method, opening + ids, shifted)
            else:
                student = _logprobs(model, method, ids, positions)
            kl = (reference.exp() * (reference - student)).sum(-1)  # [N]
            totals[method.name] += kl.sum().item()
        count += len(positions)
    return {name: total / count if count else math.nan for name, total in totals.items()}


def _no_context_opening(tokenizer: PreTrainedTokenizerBase, system_text: str) -> list[int] | None:
    """What a chat without system message puts before the turns (e.g. the BOS token)."""
    messages = [{"role": "user", "content": "x"}]
    alone = chat_ids(tokenizer, messages)
    after = continuation_ids(tokenizer, system_text, messages)
    if alone[len(alone) - len(after) :] != after:
        return None
    return alone[: len(alone) - len(after)]
