"""The evaluation report: one row per (method, task), its MLflow metrics and its log table.

The row layout is fixed here; the metric columns beyond ``quality`` come from the task registry
(e.g. ``exact_match`` of ``qa``). Scoring and timing are the runner's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from cartridges.evaluation.tasks import extra_columns


def report_columns(decode_batch_sizes: Sequence[int]) -> list[str]:
    """The report's columns, in order: the row's quality, then the method's size and costs."""
    return [
        "method",
        "kind",
        "questions",
        "task",
        "metric",
        "quality",
        "higher_is_better",
        *extra_columns(),
        "num_items",
        "kv_tokens",
        "kv_bytes",
        "compression_vs_icl",
        "prefill_ms",
        *(f"decode_tok_s_b{b}" for b in decode_batch_sizes),
        "cartridge_version",
        "note",
    ]


def report_frame(rows: Iterable[dict[str, Any]], decode_batch_sizes: Sequence[int]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=report_columns(decode_batch_sizes))


def report_metrics(report: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Finite report values in kedro-mlflow's ``{"value", "step"}`` format.

    ``<method>.<task>.<metric>`` for ``quality`` and for each further metric column the row
    fills (``<method>.qa.exact_match``); ``<method>.<cost>`` for the method's size and speed.
    """
    metrics = {}
    extras = [c for c in extra_columns() if c in report.columns]
    for row in report.to_dict("records"):
        metrics[f"{row['method']}.{row['task']}.{row['metric']}"] = row["quality"]
        for column in extras:
            metrics[f"{row['method']}.{row['task']}.{column}"] = row[column]
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
    extras = [c for c in extra_columns() if c in report.columns]
    scoped = "questions" in report.columns and (report["questions"] != "all").any()
    columns = ["method", *(["questions"] if scoped else []), "task", "metric", "quality"]
    shown = report[[*columns, *extras, "kv_bytes"]].copy()
    shown["vs_icl"] = report["compression_vs_icl"].map(
        lambda x: f"{x:.1f}x" if x < math.inf else "-"
    )
    shown["prefill_ms"] = report["prefill_ms"]
    for column in (c for c in report.columns if c.startswith("decode_tok_s_")):
        shown[column.replace("decode_tok_s_b", "tok/s@")] = report[column]
    table = shown.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")
    notes = {f"{r.method}: {r.note}" for r in report.itertuples() if r.note}
    return table + "".join(f"\n  note: {note}" for note in sorted(notes))
