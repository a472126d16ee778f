"""The interface every evaluation task implements, and what a task is given to score a method.

A task declares what it needs (questions, held-out conversations, generated answers), the report
rows it writes (its :class:`Measure`: row name, metric columns, human names, what the trade-off
plot draws) and how it scores one method. The runner, the report, the plot and the pipeline read
these declarations instead of testing task names. No task lives here: each has its own module,
registered in :mod:`cartridges.evaluation.tasks`.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import TemplateKwargs
from cartridges.evaluation.answers import answer_questions
from cartridges.evaluation.conversations import HeldOutConversation
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question

if TYPE_CHECKING:
    from cartridges.evaluation.config import EvalConfig


class Need(enum.Enum):
    """An input a task scores from."""

    QUESTIONS = "questions"  # required: evaluating without them is an error
    ANSWERS = "greedy answers"  # the method's answers to the questions, generated once
    CONVERSATIONS = "held-out conversations"  # optional: the task is skipped without them


@dataclass(frozen=True)
class Metric:
    """A number a report row holds: its name in the report and how people read it."""

    name: str
    label: str  # human name, for axes and tables
    higher_is_better: bool = True
    limits: tuple[float, float] | None = None  # the range it can take, when bounded


@dataclass(frozen=True)
class Measure:
    """One kind of report row: ``task``, ``metric``/``quality`` and any further metric columns.

    Attributes:
        task: the row's ``task`` value.
        title: its human name (plot panels).
        metric: what the ``quality`` column holds.
        extras: further metrics, each in a report column of its own name (NaN in other rows).
        plotted: the name of the metric the trade-off plot draws; empty: ``metric``.
    """

    task: str
    title: str
    metric: Metric
    extras: tuple[Metric, ...] = ()
    plotted: str = ""

    @property
    def plot_metric(self) -> Metric:
        for metric in (self.metric, *self.extras):
            if metric.name == (self.plotted or self.metric.name):
                return metric
        raise ValueError(f"Measure '{self.task}' plots unknown metric {self.plotted!r}.")

    @property
    def plot_column(self) -> str:
        """The report column the trade-off plot draws."""
        return "quality" if self.plot_metric is self.metric else self.plot_metric.name

    def row(self, quality: float, num_items: int, **extras: float) -> dict[str, Any]:
        """A report row of this measure (the method's columns are added by the runner)."""
        unknown = sorted(set(extras) - {m.name for m in self.extras})
        if unknown:
            raise ValueError(f"Measure '{self.task}' has no metric columns {unknown}.")
        return {
            "task": self.task,
            "metric": self.metric.name,
            "quality": quality,
            "higher_is_better": self.metric.higher_is_better,
            **{m.name: extras.get(m.name, math.nan) for m in self.extras},
            "num_items": num_items,
        }


@dataclass
class TaskInputs:
    """Everything tasks score a method from, shared across methods and tasks of one evaluation.

    ``teacher`` is the reference method (ICL) for tasks that compare to it; greedy answers are
    generated once per method and shared by every task that needs them. A task that scores
    several methods more cheaply together (fidelity: one teacher pass) asks :meth:`pending` which
    methods it has still to score and hands the others' rows over in ``ahead[task name][method
    name]``: the runner keeps them at once and does not ask for them again.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    questions: Sequence[Question]
    conversations: Sequence[HeldOutConversation]
    system_text: str
    config: EvalConfig
    teacher: Method | None = None
    template_kwargs: TemplateKwargs = None
    ahead: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict, repr=False)
    to_score: dict[str, list[Method]] = field(default_factory=dict, repr=False)
    _answers: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def pending(self, task: str) -> list[Method]:
        """The methods ``task`` has still to score in this evaluation, in order."""
        return list(self.to_score.get(task, ()))

    def answers(self, method: Method) -> list[str]:
        """``method``'s greedy answers, in question order."""
        if method.name not in self._answers:
            self._answers[method.name] = answer_questions(
                self.model,
                self.tokenizer,
                method,
                self.questions,
                self.system_text,
                self.config.max_new_tokens,
                self.config.batch_size,
                self.template_kwargs,
            )
        return self._answers[method.name]


class Task(ABC):
    """An evaluation task: what it needs, the rows it writes, how it scores one method."""

    name: ClassVar[str]  # its value in the ``tasks`` parameter
    summary: ClassVar[str]  # what it measures, in a few words
    needs: ClassVar[frozenset[Need]]
    measures: ClassVar[tuple[Measure, ...]]

    @abstractmethod
    def score(self, method: Method, inputs: TaskInputs) -> list[dict[str, Any]]:
        """Report rows of ``method`` (from :meth:`Measure.row`); none when nothing applies."""
