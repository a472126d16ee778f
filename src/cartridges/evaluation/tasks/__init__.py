"""The registry of evaluation tasks: the one place a task's name is looked up.

Adding a task is one module (a :class:`~cartridges.evaluation.tasks.base.Task` subclass) and one
line in ``TASKS`` below; the parameters' validation, the runner, the report's columns and
metrics, the trade-off plot and the pipeline then know it. Registry order is the default order.
"""

from __future__ import annotations

from cartridges.evaluation.tasks.base import Measure, Metric, Need, Task, TaskInputs
from cartridges.evaluation.tasks.chrf import Chrf
from cartridges.evaluation.tasks.fidelity import Fidelity
from cartridges.evaluation.tasks.log_perplexity import LogPerplexity
from cartridges.evaluation.tasks.qa import QuestionAnswering
from cartridges.evaluation.tasks.routing import Routing

TASKS: dict[str, Task] = {
    task.name: task
    for task in (QuestionAnswering(), LogPerplexity(), Fidelity(), Chrf(), Routing())
}


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        ValueError: no task has that name (the message lists those that do).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown evaluation task {name!r}; choose from {tuple(TASKS)}.") from None


def measure_of(task: str) -> Measure | None:
    """The measure whose report rows have ``task`` as their ``task`` value; ``None`` if unknown."""
    for registered in TASKS.values():
        for measure in registered.measures:
            if measure.task == task:
                return measure
    return None


def extra_columns() -> list[str]:
    """Report columns of metrics beyond ``quality`` (e.g. ``exact_match``), in registry order."""
    names = (m.name for t in TASKS.values() for measure in t.measures for m in measure.extras)
    return list(dict.fromkeys(names))


__all__ = [
    "TASKS",
    "Measure",
    "Metric",
    "Need",
    "Task",
    "TaskInputs",
    "extra_columns",
    "get_task",
    "measure_of",
]
