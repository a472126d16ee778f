"""Fidelity: the full-vocabulary KL from the ICL teacher to a method, on held-out conversations.

This is what distillation minimises, measured at the assistant tokens of self-study conversations
no evaluated cartridge trained on. All methods are scored in one pass over the conversations: the
teacher's ``[positions, vocabulary]`` log-probabilities of a conversation are computed once and
compared with every method's, so memory holds one conversation's distributions at a time and the
teacher (the longest prefix) runs once per evaluation, not once per method.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import TemplateKwargs, chat_ids, continuation_ids
from cartridges.evaluation.answers import token_logprobs
from cartridges.evaluation.conversations import HeldOutConversation
from cartridges.evaluation.methods import Method
from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs

logger = logging.getLogger(__name__)


class Fidelity(Task):
    name = "fidelity"
    summary = "KL from ICL at the assistant tokens of held-out conversations"
    needs = frozenset({Need.CONVERSATIONS})
    measure = Measure(
        "fidelity",
        "Fidelity to ICL",
        Metric("kl_from_icl", "KL from ICL (nats/token)", higher_is_better=False),
    )
    measures = (measure,)

    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        if inputs.teacher is None or not inputs.conversations:
            return []
        if method.name == inputs.teacher.name:  # KL(p || p) = 0: nothing to compute
            return [self.measure.row(0.0, len(inputs.conversations))]
        others = [
            m for m in inputs.pending(self.name) if m.name not in (method.name, inputs.teacher.name)
        ]
        together = [method, *others]  # one teacher pass for all the methods still to score
        kls = fidelity_kls(
            inputs.model,
            inputs.tokenizer,
            inputs.teacher,
            together,
            inputs.conversations,
            inputs.system_text,
            inputs.template_kwargs,
        )
        rows = [[self.measure.row(kl, len(inputs.conversations))] for kl in kls]
        inputs.ahead.setdefault(self.name, {}).update(
            (m.name, r) for m, r in zip(others, rows[1:], strict=True)
        )
        return rows[0]


def fidelity_kl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: Method,
    method: Method,
    conversations: Sequence[HeldOutConversation],
    system_text: str,
    template_kwargs: TemplateKwargs = None,
) -> float:
    """Mean KL(teacher || method) per assistant token, over the full vocabulary.

    The teacher is ICL (the whole corpus in context). A method without prefix sees the same
    tokens after the opening a chat without system message has; ``nan`` when the template
    renders the turns differently then, so that no position can be matched.
    """
    (kl,) = fidelity_kls(
        model, tokenizer, teacher, [method], conversations, system_text, template_kwargs
    )
    return kl


@torch.no_grad()
def fidelity_kls(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: Method,
    methods: Sequence[Method],
    conversations: Sequence[HeldOutConversation],
    system_text: str,
    template_kwargs: TemplateKwargs = None,
) -> list[float]:
    """:func:`fidelity_kl` of each of ``methods``, the teacher's distributions computed once."""
    openings: list[list[int] | None] = []
    for method in methods:
        opening = [] if method.prefix is not None else None
        if method.prefix is None:
            opening = _no_context_opening(tokenizer, system_text, template_kwargs)
            if opening is None:
                logger.warning(
                    "Fidelity of %s skipped: its template renders turns differently.", method.name
                )
        openings.append(opening)
    totals, count = [0.0] * len(methods), 0
    scored = [index for index, opening in enumerate(openings) if opening is not None]
    for conversation in conversations if scored else ():
        ids, positions = conversation.token_ids, conversation.positions
        reference = token_logprobs(model, teacher, ids, positions)  # [N, V]
        for index in scored:
            opening = openings[index]
            shifted = [p + len(opening) for p in positions]
            student = token_logprobs(model, methods[index], opening + ids, shifted)
            kl = (reference.exp() * (reference - student)).sum(-1)  # [N]
            totals[index] += kl.sum().item()
        count += len(positions)
    return [
        totals[index] / count if index in scored and count else math.nan
        for index in range(len(methods))
    ]


def _no_context_opening(
    tokenizer: PreTrainedTokenizerBase, system_text: str, template_kwargs: TemplateKwargs
) -> list[int] | None:
    """What a chat without system message puts before the turns (e.g. the BOS token)."""
    messages = [{"role": "user", "content": "x"}]
    alone = chat_ids(tokenizer, messages, template_kwargs=template_kwargs)
    after = continuation_ids(tokenizer, system_text, messages, template_kwargs=template_kwargs)
    if alone[len(alone) - len(after) :] != after:
        return None
    return alone[: len(alone) - len(after)]
