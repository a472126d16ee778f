"""Score and time methods on the selected tasks: the loop over methods x tasks, with progress.

Tasks are looked up in the registry (:mod:`cartridges.evaluation.tasks`) and scored one method
at a time, so a progress bar with an ETA and a log line per method show where a long evaluation
is. Building the methods is :mod:`cartridges.evaluation.methods`'; the row layout is
:mod:`cartridges.evaluation.report`'s.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import TemplateKwargs
from cartridges.evaluation.answers import question_ids
from cartridges.evaluation.config import EvalConfig
from cartridges.evaluation.conversations import HeldOutConversation
from cartridges.evaluation.cost import measure_cost
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question, QuestionsError
from cartridges.evaluation.report import report_frame
from cartridges.evaluation.results import COST, EvaluationResults, evaluation_key
from cartridges.evaluation.tasks import TASKS, Need, Task, TaskInputs, measure_of
from cartridges.modeling import pad_token_id
from cartridges.progress import progress_bar

logger = logging.getLogger(__name__)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    questions: Sequence[Question],
    conversations: Sequence[HeldOutConversation],
    system_text: str,
    config: EvalConfig,
    template_kwargs: TemplateKwargs = None,
    results_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Score and time every method; the first method (ICL) is the teacher and the reference.

    A task that needs held-out conversations is skipped when there are none. With
    ``results_dir``, each (method, task) result is saved as it completes and a rerun with the
    same inputs reads those instead of computing them again (:mod:`.results`).

    Raises:
        QuestionsError: a task needs questions and there are none.
    """
    tasks = _runnable(config.selected, questions, conversations)
    inputs = TaskInputs(
        model, tokenizer, questions, conversations, system_text, config, methods[0], template_kwargs
    )
    key = evaluation_key(
        model, tokenizer, questions, conversations, system_text, config, template_kwargs
    )
    results = EvaluationResults(results_dir, key)
    plan = [(method, [COST] + [t.name for t in _tasks_of(method, tasks)]) for method in methods]
    found = {
        (method.name, name): value
        for method, names in plan
        for name in names
        if (value := results.load(method, name)) is not None
    }
    missing = [(m, name) for m, names in plan for name in names if (m.name, name) not in found]
    for task in tasks:
        inputs.to_score[task.name] = [m for m, name in missing if name == task.name]
    if found:
        logger.info(
            "Evaluation resumed from %s: %d of %d results there, computing %d.",
            results.folder,
            len(found),
            len(found) + len(missing),
            len(missing),
        )
    weights = _work_weights(model, methods)
    rows, done = [], 0
    with _work_bar(weights, missing) as bar:
        for index, (method, names) in enumerate(plan, start=1):
            started = time.perf_counter()
            scored, common = [], {}
            for name in names:
                value = found.get((method.name, name))
                if value is None:
                    bar.set_postfix_str(f"{done}/{len(missing)} results, {method.name}: {name}")
                    value = _compute(inputs, method, name, methods[0])
                    for other, computed in [(method, value), *_ahead(inputs, name, methods)]:
                        results.save(other, name, computed)
                        found[other.name, name] = computed
                        if name in inputs.to_score:
                            inputs.to_score[name].remove(other)
                        done += 1
                        bar.update(weights[other.name])
                    bar.set_postfix_str(f"{done}/{len(missing)} results")
                if name == COST:
                    common = value
                else:
                    scored += value
            rows += [row | common for row in scored]
            logger.info(
                "Evaluated %s (%d/%d) in %.1f s: %s",
                method.name,
                index,
                len(methods),
                time.perf_counter() - started,
                _summary(scored),
            )
    return report_frame(rows, config.decode_batch_sizes)


def _compute(inputs: TaskInputs, method: Method, name: str, icl: Method) -> Any:
    """One result: the method's cost columns, or a task's rows."""
    if name == COST:
        return _costs(inputs, method, icl)
    return TASKS[name].score(method, _inputs_of(method, inputs))


def _ahead(inputs: TaskInputs, task: str, methods: Sequence[Method]) -> list[tuple[Method, Any]]:
    """Rows ``task`` computed for other methods along the way (to keep now, not recompute)."""
    computed = inputs.ahead.pop(task, {})
    return [(m, computed[m.name]) for m in methods if m.name in computed]


def _work_weights(model: PreTrainedModel, methods: Sequence[Method]) -> dict[str, float]:
    """Each method's relative work per token: the model's FLOPs plus attention over its prefix.

    The progress bar advances by these, so that its ETA after the first method (ICL, the
    longest prefix) does not take every method to cost as much.
    """
    text = model.config.get_text_config(decoder=True)
    layers = getattr(text, "num_hidden_layers", 1)
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 64) // heads
    per_prefix_token = 4 * layers * heads * head_dim  # scores and values, per query
    per_token = max(2 * model.num_parameters(), 1)
    return {m.name: 1.0 + m.num_tokens * per_prefix_token / per_token for m in methods}


def _work_bar(weights: dict[str, float], missing: Sequence[tuple[Method, str]]):
    """The evaluation's bar, in percent of the estimated work still to do in this run."""
    total = sum(weights[method.name] for method, _ in missing)
    bar = progress_bar(
        total=total,
        desc="evaluation",
        unit="work",
        smoothing=0,  # the ETA from the average rate: units are weighted, not alike
        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    return bar


def score_method(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    config: EvalConfig,
    template_kwargs: TemplateKwargs = None,
) -> list[dict[str, Any]]:
    """Report rows of ``method`` on the selected tasks that score from questions alone.

    ``model`` may be the frozen model with an adapter (the LoRA baseline): it answers after the
    method's prefix like any other.
    """
    tasks = [task for task in config.selected if Need.CONVERSATIONS not in task.needs]
    tasks = _runnable(tasks, questions, ())
    inputs = TaskInputs(
        model, tokenizer, questions, (), system_text, config, template_kwargs=template_kwargs
    )
    return [row for task in tasks for row in task.score(method, inputs)]


def question_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    config: EvalConfig,
    template_kwargs: TemplateKwargs = None,
) -> dict[str, float]:
    """:func:`score_method` as ``{task: quality, "<task>_<metric>": value}`` (``qa_exact_match``).

    Empty without questions, so that a caller with an optional question set needs no check.
    """
    if not questions:
        return {}
    scores = {}
    rows = score_method(model, tokenizer, method, questions, system_text, config, template_kwargs)
    for row in rows:
        scores[row["task"]] = row["quality"]
        measure = measure_of(row["task"])
        for metric in measure.extras if measure is not None else ():
            scores[f"{row['task']}_{metric.name}"] = row[metric.name]
    return scores


def _runnable(
    tasks: Sequence[Task],
    questions: Sequence[Question],
    conversations: Sequence[HeldOutConversation],
) -> list[Task]:
    """``tasks`` minus those missing held-out conversations; refuses a missing question set."""
    asking = [task.name for task in tasks if Need.QUESTIONS in task.needs]
    if asking and not questions:
        raise QuestionsError(
            f"The question set is empty: the {', '.join(asking)} task(s) need one."
        )
    return [task for task in tasks if conversations or Need.CONVERSATIONS not in task.needs]


def _tasks_of(method: Method, tasks: Sequence[Task]) -> list[Task]:
    """A method scored on some documents' questions only takes the question tasks (held-out
    conversations are about the whole corpus)."""
    if method.documents is None:
        return list(tasks)
    return [task for task in tasks if Need.CONVERSATIONS not in task.needs]


def _inputs_of(method: Method, inputs: TaskInputs) -> TaskInputs:
    """The inputs with only the questions ``method`` is scored on."""
    if method.documents is None:
        return inputs
    asked = [q for q in inputs.questions if q.document in method.documents]
    return replace(inputs, questions=asked, conversations=())


def _costs(inputs: TaskInputs, method: Method, icl: Method) -> dict[str, Any]:
    """The method's columns of every row: its size, its speed and where it came from."""
    text = inputs.questions[0].question if inputs.questions else "What is this document about?"
    prompt = question_ids(
        inputs.tokenizer,
        method,
        inputs.system_text,
        [{"role": "user", "content": text}],
        template_kwargs=inputs.template_kwargs,
    )
    config = inputs.config
    costs = measure_cost(
        inputs.model,
        method,
        prompt,
        config.decode_tokens,
        config.decode_batch_sizes,
        config.cost_repeats,
        pad_token_id(inputs.tokenizer),
    )
    return costs | {
        "method": method.name,
        "kind": method.kind,
        "questions": method.questions,
        "kv_tokens": method.num_tokens,
        "kv_bytes": method.kv_bytes,
        # Against the whole corpus in context, also when ICL had to be cut to fit the model.
        "compression_vs_icl": icl.whole_kv_bytes / method.kv_bytes if method.kv_bytes else math.inf,
        "cartridge_version": method.version,
        "note": method.note,
    }


def _summary(rows: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{r['task']} {r['metric']} {r['quality']:.4g}" for r in rows) or "no scores"
