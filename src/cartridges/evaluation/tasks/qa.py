"""Question answering: greedy answers scored by token F1 and exact match, or option accuracy.

Open questions write a ``qa`` row (token F1 in ``quality``, exact match in its own column; the
trade-off plot draws exact match, the headline number), multiple-choice questions a
``multiple_choice`` row (the option the answer picks, as in the paper's LongHealth scoring).
"""

from __future__ import annotations

from typing import Any

from cartridges.evaluation.methods import Method
from cartridges.evaluation.scoring import choose_option, exact_match, mean, token_f1
from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs

UNIT = (0.0, 1.0)


class QuestionAnswering(Task):
    name = "qa"
    summary = "exact match and token F1 of greedy answers; option accuracy for multiple choice"
    needs = frozenset({Need.QUESTIONS, Need.ANSWERS})
    open_questions = Measure(
        "qa",
        "Question answering",
        Metric("token_f1", "Token F1", limits=UNIT),
        extras=(Metric("exact_match", "Exact match", limits=UNIT),),
        plotted="exact_match",
    )
    multiple_choice = Measure(
        "multiple_choice", "Multiple choice", Metric("option_accuracy", "Accuracy", limits=UNIT)
    )
    measures = (open_questions, multiple_choice)

    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        answers = inputs.answers(method)
        rows = []
        pairs = list(zip(answers, inputs.questions, strict=True))
        open_pairs = [(answer, q) for answer, q in pairs if not q.options]
        if open_pairs:
            predicted, references = [a for a, _ in open_pairs], [q.answer for _, q in open_pairs]
            f1 = mean(map(token_f1, predicted, references))
            exact = mean(map(exact_match, predicted, references))
            rows.append(self.open_questions.row(f1, len(open_pairs), exact_match=exact))
        correct = [
            choose_option(answer, q.options) == q.answer_index for answer, q in pairs if q.options
        ]
        if correct:
            rows.append(self.multiple_choice.row(mean(correct), len(correct)))
        return rows
