"""Run the selected tasks for every method and gather one report row per (method, task)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import field
from typing import Any

import pandas as pd
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.evaluation.cost import measure_cost
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question, QuestionsError
from cartridges.evaluation.scoring import choose_option, chrf, exact_match, token_f1
from cartridges.evaluation.tasks import (
    HeldOutConversation,
    answer_log_perplexity,
    answer_questions,
    fidelity_kl,
    question_ids,
)

TASKS = ("qa", "log_perplexity", "fidelity", "chrf")
COLUMNS = [
    "method",
    "kind",
    "task",
    "metric",
    "quality",
    "higher_is_better",
    "exact_match",
    "num_items",
    "kv_tokens",
    "kv_bytes",
    "compression_vs_icl",
    "prefill_ms",
    # then decode_tok_s_b{B} for each timed batch size
    "cartridge_version",
    "note",
]


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EvalConfig:
    """What to evaluate and how (the ``evaluation`` parameters, minus where cartridges live).

    Args:
        tasks: any of ``qa`` (exact match and token F1; option accuracy for multiple choice),
            ``log_perplexity`` (of the reference answers), ``fidelity`` (KL from ICL on held-out
            conversations), ``chrf`` (of the generated answers, for translation-style sets).
        max_new_tokens: cap on each greedy answer.
        batch_size: questions generated together.
        fidelity_conversations: held-out conversations the KL is averaged over (at most).
        decode_tokens: tokens generated per row when timing decoding.
        decode_batch_sizes: batch sizes decoding is timed at.
        cost_repeats: timed repeats per measurement (the median is reported).
    """

    tasks: tuple[str, ...] = TASKS
    max_new_tokens: int = 24
    batch_size: int = 16
    fidelity_conversations: int = 32
    decode_tokens: int = 16
    decode_batch_sizes: tuple[int, ...] = field(default=(1, 16))
    cost_repeats: int = 3

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(
                f"Unknown or no evaluation tasks {unknown or []}; choose from {TASKS}."
            )
        for name in ("max_new_tokens", "batch_size", "decode_tokens", "cost_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def needs_questions(self) -> bool:
        return bool({"qa", "log_perplexity", "chrf"} & set(self.tasks))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    questions: Sequence[Question],
    conversations: Sequence[HeldOutConversation],
    system_text: str,
    config: EvalConfig,
) -> pd.DataFrame:
    """Score and time every method; the first method (ICL) is the teacher and the reference.

    Raises:
        QuestionsError: a task needs questions and there are none.
    """
    if config.needs_questions and not questions:
        raise QuestionsError(
            "The question set is empty: the qa, log_perplexity and chrf tasks need one."
        )
    icl = methods[0]
    fidelity = {}
    if "fidelity" in config.tasks and conversations:
        fidelity = fidelity_kl(model, tokenizer, icl, methods, conversations, system_text)
    rows = []
    for method in methods:
        common = _costs(model, tokenizer, method, icl, questions, system_text, config)
        for row in score_method(model, tokenizer, method, questions, system_text, config):
            rows.append(row | common)
        if method.name in fidelity:
            rows.append(
                _row("fidelity", "kl_from_icl", fidelity[method.name], False, len(conversations))
                | common
            )
    decode = [f"decode_tok_s_b{b}" for b in config.decode_batch_sizes]
    return pd.DataFrame(rows, columns=[*COLUMNS[:-2], *decode, *COLUMNS[-2:]])


def score_method(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    config: EvalConfig,
) -> list[dict[str, Any]]:
    """Report rows of ``method`` on the question tasks of ``config`` (qa, chrf, log_perplexity).

    ``model`` may be the frozen model with an adapter (the LoRA baseline): it answers after the
    method's prefix like any other.
    """
    rows = []
    open_questions = [q for q in questions if q.options is None]
    choice_questions = [q for q in questions if q.options is not None]
    if {"qa", "chrf"} & set(config.tasks):
        answers = answer_questions(
            model,
            tokenizer,
            method,
            questions,
            system_text,
            config.max_new_tokens,
            config.batch_size,
        )
        by_question = dict(zip(map(id, questions), answers, strict=True))
        predicted = [by_question[id(q)] for q in open_questions]
        references = [q.answer for q in open_questions]
        if "qa" in config.tasks and open_questions:
            f1 = _mean(map(token_f1, predicted, references))
            row = _row("qa", "token_f1", f1, True, len(open_questions))
            rows.append(row | {"exact_match": _mean(map(exact_match, predicted, references))})
        if "qa" in config.tasks and choice_questions:
            correct = [
                choose_option(by_question[id(q)], q.options) == q.answer_index
                for q in choice_questions
            ]
            rows.append(
                _row("multiple_choice", "option_accuracy", _mean(correct), True, len(correct))
            )
        if "chrf" in config.tasks and open_questions:
            rows.append(_row("chrf", "chrf", chrf(predicted, references), True, len(predicted)))
    if "log_perplexity" in config.tasks:
        nll = answer_log_perplexity(model, tokenizer, method, questions, system_text)
        rows.append(_row("log_perplexity", "answer_log_perplexity", nll, False, len(questions)))
    return rows


def _costs(model, tokenizer, method, icl, questions, system_text, config) -> dict[str, Any]:
    text = questions[0].question if questions else "What is this document about?"
    prompt = question_ids(tokenizer, method, system_text, [{"role": "user", "content": text}])
    costs = measure_cost(
        model,
        method,
        prompt,
        config.decode_tokens,
        config.decode_batch_sizes,
        config.cost_repeats,
        tokenizer.pad_token_id or 0,
    )
    return costs | {
        "method": method.name,
        "kind": method.kind,
        "kv_tokens": method.num_tokens,
        "kv_bytes": method.kv_bytes,
        "compression_vs_icl": icl.kv_bytes / method.kv_bytes if method.kv_bytes else math.inf,
        "cartridge_version": method.version,
        "note": method.note,
    }


def _row(task: str, metric: str, quality: float, higher: bool, count: int) -> dict[str, Any]:
    return {
        "task": task,
        "metric": metric,
        "quality": quality,
        "higher_is_better": higher,
        "exact_match": math.nan,
        "num_items": count,
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def report_metrics(report: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Finite report values in kedro-mlflow's ``{"value", "step"}`` format."""
    metrics = {}
    for row in report.itertuples():
        metrics[f"{row.method}.{row.task}.{row.metric}"] = row.quality
        if row.task == "qa":
            metrics[f"{row.method}.qa.exact_match"] = row.exact_match
    costs = ["kv_bytes", "compression_vs_icl", "prefill_ms"]
    costs += [c for c in report.columns if c.startswith("decode_tok_s_")]
    for row in report.drop_duplicates("method").to_dict("records"):
        for name in costs:
            metrics[f"{row['method']}.{name}"] = row[name]
    return {
        name: {"value": float(value), "step": 0}
        for name, value in metrics.items()
        if value is not None and math.isfinite(float(value))
    }


def format_report(report: pd.DataFrame) -> str:
    """The report as a readable fixed-width table, for the log."""
    shown = report[["method", "task", "metric", "quality", "kv_bytes"]].copy()
    shown["vs_icl"] = report["compression_vs_icl"].map(
        lambda x: f"{x:.1f}x" if x < math.inf else "-"
    )
    shown["prefill_ms"] = report["prefill_ms"]
    for column in (c for c in report.columns if c.startswith("decode_tok_s_")):
        shown[column.replace("decode_tok_s_b", "tok/s@")] = report[column]
    table = shown.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")
    notes = {f"{r.method}: {r.note}" for r in report.itertuples() if r.note}
    return table + "".join(f"\n  note: {note}" for note in sorted(notes))
