"""Routing accuracy: how often a routed method loads the cartridge of the question's document.

Only routed methods write a row (the others load what they load for every question). A question
counts when its document is among the cartridges selected for it, so with ``top_k`` above one
the accuracy is a recall at k.
"""

from __future__ import annotations

from typing import Any

from cartridges.evaluation.methods import Method
from cartridges.evaluation.scoring import mean
from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs


class Routing(Task):
    name = "routing"
    summary = "share of questions whose own document is among the cartridges routed to"
    needs = frozenset({Need.QUESTIONS})
    measure = Measure(
        "routing", "Routing", Metric("routing_accuracy", "Routing accuracy", limits=(0.0, 1.0))
    )
    measures = (measure,)

    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        if method.routes is None:
            return []
        labelled = [q for q in inputs.questions if q.document is not None]
        if not labelled:
            return []
        hits = [q.document in method.routes.choose(q) for q in labelled]
        return [self.measure.row(mean(hits), len(hits))]
