"""Fidelity: the full-vocabulary KL from the ICL teacher to a method, on held-out conversations.

This is what distillation minimises, measured at the assistant tokens of self-study conversations
no evaluated cartridge trained on. The teacher's log-probabilities are recomputed for every method
so that memory holds one conversation's ``[positions, vocabulary]`` at a time (a few forward
passes, small next to generating the answers).
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
        kl = fidelity_kl(
            inputs.model,
            inputs.tokenizer,
            inputs.teacher,
            method,
            inputs.conversations,
            inputs.system_text,
            inputs.template_kwargs,
        )
        return [self.measure.row(kl, len(inputs.conversations))]


@torch.no_grad()
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
    opening = None
    if method.prefix is None:
        opening = _no_context_opening(tokenizer, system_text, template_kwargs)
        if opening is None:
            logger.warning(
                "Fidelity of %s skipped: its template renders turns differently.", method.name
            )
            return math.nan
    total, count = 0.0, 0
    for conversation in conversations:
        ids, positions = conversation.token_ids, conversation.positions
        reference = token_logprobs(model, teacher, ids, positions)  # [N, V]
        if opening is None:
            student = token_logprobs(model, method, ids, positions)
        else:
            shifted = [p + len(opening) for p in positions]
            student = token_logprobs(model, method, opening + ids, shifted)
        kl = (reference.exp() * (reference - student)).sum(-1)  # [N]
        total += kl.sum().item()
        count += len(positions)
    return total / count if count else math.nan


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
