"""What to evaluate and how: the library's settings, checked against the task registry."""

from __future__ import annotations

from dataclasses import field

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cartridges.checks import Problems
from cartridges.evaluation.answers import QUESTION_BATCH
from cartridges.evaluation.tasks import TASKS, Need, Task


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EvalConfig:
    """What to evaluate and how (the ``evaluation`` parameters, minus where cartridges live).

    Args:
        tasks: names of registered tasks (:data:`cartridges.evaluation.tasks.TASKS`): ``qa``
            (exact match and token F1; option accuracy for multiple choice), ``log_perplexity``
            (of the reference answers), ``fidelity`` (KL from ICL on held-out conversations),
            ``chrf`` (of the generated answers, for translation-style sets).
        max_new_tokens: cap on each greedy answer.
        batch_size: questions answered together (and reference answers scored together).
        fidelity_conversations: held-out conversations the KL is averaged over (at most).
        decode_tokens: tokens generated per row when timing decoding (each step is timed; the
            median step gives the rate).
        decode_batch_sizes: batch sizes decoding is timed at.
        cost_repeats: timed repeats of the prompt's prefill (the median is reported).
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    max_new_tokens: int = 24
    batch_size: int = QUESTION_BATCH
    fidelity_conversations: int = 32
    decode_tokens: int = 16
    decode_batch_sizes: tuple[int, ...] = field(default=(1, 16))
    cost_repeats: int = 3

    def __post_init__(self) -> None:
        problems = Problems()
        unknown = sorted(set(self.tasks) - set(TASKS))
        problems.require(
            not unknown and bool(self.tasks),
            f"Unknown or no evaluation tasks {unknown}; choose from {tuple(TASKS)}.",
        )
        problems.at_least(
            self,
            1,
            "max_new_tokens",
            "batch_size",
            "decode_tokens",
            "cost_repeats",
            prefix="evaluation.",
        )
        problems.raise_any()

    @property
    def selected(self) -> list[Task]:
        """The selected tasks, in the order given."""
        return [TASKS[name] for name in dict.fromkeys(self.tasks)]

    def needs(self, need: Need) -> bool:
        """Whether a selected task scores from ``need``."""
        return any(need in task.needs for task in self.selected)
