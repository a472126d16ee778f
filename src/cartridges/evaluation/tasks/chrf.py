"""chrF of the greedy answers to open questions, for translation-style question sets."""

from __future__ import annotations

from typing import Any

from cartridges.evaluation.methods import Method
from cartridges.evaluation.scoring import chrf
from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs


class Chrf(Task):
    name = "chrf"
    summary = "sacrebleu chrF of the greedy answers (translation-style sets)"
    needs = frozenset({Need.QUESTIONS, Need.ANSWERS})
    measure = Measure("chrf", "Answer chrF", Metric("chrf", "chrF", limits=(0.0, 100.0)))
    measures = (measure,)

    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        pairs = [
            (answer, q.answer)
            for answer, q in zip(inputs.answers(method), inputs.questions, strict=True)
            if not q.options
        ]
        if not pairs:
            return []
        predicted, references = zip(*pairs, strict=True)
        return [self.measure.row(chrf(predicted, references), len(pairs))]
