"""Log-perplexity of the reference answers under teacher forcing, after the method's prefix.

Needs no generation: it reads how likely the method finds the right answer, which separates
methods even where greedy answers are all wrong (or all right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import TemplateKwargs
from cartridges.evaluation.answers import (
    QUESTION_BATCH,
    generation_suffix,
    logprob_batches,
    question_ids,
    rows_logprobs,
    user_message,
)
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question
from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs
from cartridges.modeling import pad_token_id


class LogPerplexity(Task):
    name = "log_perplexity"
    summary = "mean negative log-likelihood per token of the reference answers"
    needs = frozenset({Need.QUESTIONS})
    measure = Measure(
        "log_perplexity",
        "Answer log-perplexity",
        Metric("answer_log_perplexity", "Log-perplexity (nats/token)", higher_is_better=False),
    )
    measures = (measure,)

    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        nll = answer_log_perplexity(
            inputs.model,
            inputs.tokenizer,
            method,
            inputs.questions,
            inputs.system_text,
            inputs.template_kwargs,
            inputs.config.batch_size,
        )
        return [self.measure.row(nll, len(inputs.questions))]


@torch.no_grad()
def answer_log_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    template_kwargs: TemplateKwargs = None,
    batch_size: int = QUESTION_BATCH,
) -> float:
    """Mean negative log-likelihood per token of the reference answers (teacher forcing).

    Questions answered after the same prefix (all of them, or for a routed method those that
    share a selection) are scored up to ``batch_size`` at a time, shortest with shortest (one
    padded forward: the same log-probabilities as one at a time, up to rounding).
    """
    groups: dict[tuple[str, ...], list[Question]] = {}
    for q in questions:
        groups.setdefault(method.routes.choose(q) if method.routes else (), []).append(q)
    nll, count = 0.0, 0
    for asked in groups.values():  # each selection's composition built once, dropped after
        answering = method.for_question(asked[0])
        rows = [_answer_row(tokenizer, answering, q, system_text, template_kwargs) for q in asked]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        lengths = [len(rows[i][0]) for i in order]
        for batch in logprob_batches(model, answering, lengths, batch_size):
            chosen = [rows[order[i]] for i in batch]
            scored = rows_logprobs(model, answering, chosen, pad_token_id(tokenizer))
            for (ids, positions), logprobs in zip(chosen, scored, strict=True):
                targets = torch.tensor(ids[positions.start :], device=logprobs.device)
                nll -= logprobs.gather(-1, targets[:, None]).sum().item()
                count += len(targets)
    return nll / max(count, 1)


def _answer_row(
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    question: Question,
    system_text: str,
    template_kwargs: TemplateKwargs,
) -> tuple[list[int], range]:
    """The question and its reference answer after ``method``'s prefix, and where the answer is."""
    user = user_message(question)
    prompt = question_ids(tokenizer, method, system_text, [user], True, template_kwargs)
    full = question_ids(
        tokenizer,
        method,
        system_text,
        [user, {"role": "assistant", "content": question.answer}],
        template_kwargs=template_kwargs,
    )
    # The full rendering ends with the answer turn; drop any generation prompt appended.
    full = full[: len(full) - generation_suffix(tokenizer, template_kwargs)]
    return full, range(len(prompt), len(full))
