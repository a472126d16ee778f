"""Nodes of evaluation: ICL, no context, truncated ICL and the cartridge on held-out questions."""

from __future__ import annotations

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the plot is a catalog artifact, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cartridges.cartridge import Cartridge  # noqa: E402
from cartridges.corpus import join_documents  # noqa: E402
from cartridges.evaluation import (  # noqa: E402
    Question,
    answer_log_perplexity,
    answer_questions,
    build_methods,
    exact_match,
    token_f1,
)
from cartridges.modeling import load_model  # noqa: E402

logger = logging.getLogger(__name__)


def _questions(table: pd.DataFrame) -> list[Question]:
    missing = {"question", "answer"} - set(table.columns)
    if missing:
        raise ValueError(f"The questions file lacks column(s) {sorted(missing)}.")
    if table.empty:
        raise ValueError("The questions file holds no question.")
    return [Question(str(r.question), str(r.answer)) for r in table.itertuples()]


def evaluate_methods(
    corpus: pd.DataFrame,
    cartridge: Cartridge,
    eval_questions: pd.DataFrame,
    params: dict[str, Any],
    model: dict[str, Any],
    system_prompt: str,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every method on the questions; one report row per method.

    Returns:
        ``evaluation_report`` and ``evaluation_metrics`` (kedro-mlflow format).
    """
    llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
    questions = _questions(eval_questions)
    system_text = system_prompt.format(chunk=join_documents(list(corpus["text"])))
    methods = build_methods(
        llm,
        tokenizer,
        join_documents(list(corpus["text"])),
        system_prompt,
        {"cartridge": cartridge},
    )
    icl_bytes = methods[0].kv_bytes
    rows = []
    for method in methods:
        predictions = answer_questions(
            llm,
            tokenizer,
            method,
            questions,
            system_text,
            params["max_new_tokens"],
            params["batch_size"],
        )
        rows.append(
            {
                "method": method.name,
                "task": "qa",
                "kv_tokens": method.num_tokens,
                "kv_bytes": method.kv_bytes,
                "compression_vs_icl": icl_bytes / method.kv_bytes
                if method.kv_bytes
                else float("inf"),
                "exact_match": sum(map(exact_match, predictions, [q.answer for q in questions]))
                / len(questions),
                "token_f1": sum(map(token_f1, predictions, [q.answer for q in questions]))
                / len(questions),
                "answer_log_perplexity": answer_log_perplexity(
                    llm, tokenizer, method, questions, system_text
                ),
                "num_questions": len(questions),
                "note": method.note,
            }
        )
    report = pd.DataFrame(rows)
    logger.info(
        "Evaluation report:\n%s",
        report.drop(columns=["note", "task"]).to_string(index=False, float_format="%.3f"),
    )
    metrics = {
        f"{row.method}.{name}": {"value": float(getattr(row, name)), "step": 0}
        for row in report.itertuples()
        for name in ("exact_match", "token_f1", "answer_log_perplexity")
    }
    return report, metrics


def plot_tradeoff(evaluation_report: pd.DataFrame) -> plt.Figure:
    """Quality versus KV memory (log x), one point per method, as in the paper's figure."""
    figure, axis = plt.subplots(figsize=(6, 4))
    with_memory = evaluation_report[evaluation_report["kv_bytes"] > 0]
    for row in with_memory.itertuples():
        axis.scatter(row.kv_bytes, row.token_f1, s=40)
        axis.annotate(
            row.method, (row.kv_bytes, row.token_f1), textcoords="offset points", xytext=(4, 4)
        )
    for row in evaluation_report[evaluation_report["kv_bytes"] == 0].itertuples():
        axis.axhline(row.token_f1, linestyle="--", color="grey", label=row.method)
    axis.set_xscale("log")
    axis.set_xlabel("KV cache bytes (log scale)")
    axis.set_ylabel("token F1")
    axis.set_title("Quality versus memory")
    if len(evaluation_report[evaluation_report["kv_bytes"] == 0]):
        axis.legend()
    figure.tight_layout()
    return figure
