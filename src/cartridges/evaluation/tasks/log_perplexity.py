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
    batch_size: int = 16,
) -> float:
    """Mean negative log-likelihood per token of the reference answers (teacher forcing).

    Questions answered after the same prefix are scored ``batch_size`` at a time (one padded
    forward: the same log-probabilities as one question at a time, up to rounding).
    """
    suffix = generation_suffix(tokenizer, template_kwargs)
    groups: dict[int, tuple[Method, list[tuple[list[int], range]]]] = {}
    for q in questions:
        user = user_message(q)
        answering = method.for_question(q)
        prompt = question_ids(tokenizer, answering, system_text, [user], True, template_kwargs)
        full = question_ids(
            tokenizer,
            answering,
            system_text,
            [user, {"role": "assistant", "content": q.answer}],
            template_kwargs=template_kwargs,
        )
        # The full rendering ends with the answer turn; drop any generation prompt appended.
        full = full[: len(full) - suffix]
        rows = groups.setdefault(id(answering.prefix), (answering, []))[1]
        rows.append((full, range(len(prompt), len(full))))
    total, count = 0.0, 0
    pad = pad_token_id(tokenizer)
    for answering, rows in groups.values():
        lengths = [len(ids) for ids, _ in rows]
        for batch in logprob_batches(model, answering, lengths, batch_size):
            chosen = [rows[i] for i in batch]
            for (ids, positions), logprobs in zip(
                chosen, rows_logprobs(model, answering, chosen, pad), strict=True
            ):
                targets = torch.tensor(ids[positions.start :], device=logprobs.device)
                total -= logprobs.gather(-1, targets[:, None]).sum().item()
                count += len(targets)
    return total / max(count, 1)
