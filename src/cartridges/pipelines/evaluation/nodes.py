"""Nodes of evaluation: ICL, no context, truncated ICL and cartridges on the same tasks."""

from __future__ import annotations

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the plot is a catalog artifact, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cartridges import lineage  # noqa: E402
from cartridges.cartridge import Cartridge  # noqa: E402
from cartridges.chat import context_ids  # noqa: E402
from cartridges.corpus import join_documents  # noqa: E402
from cartridges.datasets import CartridgeHistory  # noqa: E402
from cartridges.evaluation import (  # noqa: E402
    Question,
    build_methods,
    context_budget,
    evaluate,
    format_report,
    held_out_conversations,
    prompt_text,
    question_ids,
    report_metrics,
)
from cartridges.evaluation.methods import Method  # noqa: E402
from cartridges.modeling import load_model  # noqa: E402
from cartridges.params import EvaluationParams, ModelParams, parse  # noqa: E402
from cartridges.tables import ShardedTable  # noqa: E402

logger = logging.getLogger(__name__)


def evaluate_methods(
    corpus: pd.DataFrame,
    questions: list[Question],
    cartridge: Cartridge,
    cartridge_history: CartridgeHistory,
    cartridge_sweep: dict[str, Cartridge],
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: EvaluationParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score and time every method on the selected tasks; one report row per (method, task).

    Args:
        corpus: documents; ICL puts them all in the system message.
        questions: the evaluation questions (the ``questions`` catalog entry).
        cartridge: the catalog's cartridge (latest, or ``--load-versions``), evaluated unless
            ``cartridge_versions`` lists versions to compare instead.
        cartridge_history: every saved version of ``cartridge``, to pick those from.
        cartridge_sweep: cartridges of several sizes p (``{"p<p>": cartridge}``), evaluated too
            when ``include_sweep`` is set.
        conversations: self-study conversations; fidelity uses those held out of training.
        teacher_logprobs: where the assistant tokens of each conversation are.
        params: the ``evaluation`` parameters.

    Returns:
        ``evaluation_report`` and ``evaluation_metrics`` (kedro-mlflow format).
    """
    params, model = parse("evaluation", params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    config = params.eval_config
    questions = list(questions) if config.needs_questions else []
    llm, tokenizer = load_model(model.name_or_path, model.dtype, model.device)
    cartridges, versions = _select_cartridges(cartridge, cartridge_history, params)
    if params.include_sweep:
        cartridges |= {f"sweep_{name}": swept for name, swept in cartridge_sweep.items()}
        versions |= {f"sweep_{name}": _version(swept) for name, swept in cartridge_sweep.items()}
    system_text = system_prompt.format(chunk=join_documents(list(corpus["text"])))
    held_out = []
    if "fidelity" in config.tasks:
        held_out = held_out_conversations(
            conversations,
            teacher_logprobs,
            _held_out_ids(cartridges),
            config.fidelity_conversations,
        )
        if not held_out:
            logger.warning("Fidelity skipped: no held-out conversation with teacher targets.")
    no_context = Method("no_context", "no_context", None)
    reserve = max(
        [len(question_ids(tokenizer, no_context, "", [_user(q)])) for q in questions]
        + [len(c.token_ids) for c in held_out]
        + [1]
    )
    budget = context_budget(llm, reserve + config.max_new_tokens, params.max_context_tokens)
    methods = build_methods(
        llm,
        context_ids(tokenizer, system_text),
        cartridges,
        budget,
        versions,
        params.compose,
    )
    report = evaluate(llm, tokenizer, methods, questions, held_out, system_text, config)
    logger.info("Evaluation report:\n%s", format_report(report))
    return report, report_metrics(report)


def _user(question) -> dict[str, str]:
    return {"role": "user", "content": prompt_text(question)}


def _select_cartridges(
    latest: Cartridge, history: CartridgeHistory, params: EvaluationParams
) -> tuple[dict[str, Cartridge], dict[str, str]]:
    """The cartridges to compare by report name, and their versions.

    No ``cartridge_versions``: the catalog's cartridge, named ``cartridge``. Otherwise each listed
    version of the catalog's ``cartridge`` entry, named ``cartridge_p{p}`` (so sizes can be
    compared).
    """
    listed = list(params.cartridge_versions)
    if not listed:
        return {"cartridge": latest}, {"cartridge": _version(latest)}
    cartridges, versions = {}, {}
    for version in listed:
        loaded = history.load(version)
        name = "cartridge" if len(listed) == 1 else f"cartridge_p{loaded.num_tokens}"
        if name in cartridges:
            name = f"{name}_{version}"
        cartridges[name], versions[name] = loaded, version
    return cartridges, versions


def _version(cartridge: Cartridge) -> str:
    """The catalog version a cartridge was read from (or, failing that, saved as)."""
    extra = cartridge.info.extra
    return extra.get("catalog_version") or (extra.get(lineage.LINEAGE) or {}).get("version") or ""


def _held_out_ids(cartridges: dict[str, Cartridge]) -> list[str] | None:
    """Conversations no selected cartridge trained on; ``None`` (all) when one does not say."""
    recorded = [c.info.extra.get("held_out_conversations") for c in cartridges.values()]
    if any(ids is None for ids in recorded):
        logger.warning(
            "A cartridge does not record its held-out conversations (trained before they were "
            "recorded): fidelity is measured on conversations it may have trained on."
        )
        return None
    return sorted(set.intersection(*(set(ids) for ids in recorded)))


def plot_tradeoff(evaluation_report: pd.DataFrame) -> plt.Figure:
    """Quality versus KV memory (log x), one panel per task, as in the paper's figure.

    Each method and cartridge size is one point; truncated ICL and the cartridges are joined
    across sizes; no context (no KV at all) is a dashed line.
    """
    panels = evaluation_report.dropna(subset=["quality"]).groupby(["task", "metric"], sort=False)
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for axis, ((task, metric), rows) in zip(axes, panels, strict=False):
        with_memory = rows[rows["kv_bytes"] > 0]
        for kind, series in with_memory.groupby("kind", sort=False):
            series = series.sort_values("kv_bytes")
            marker = {"icl": "*", "truncated_icl": "s", "composition": "D"}.get(kind, "o")
            axis.plot(series["kv_bytes"], series["quality"], marker=marker, label=kind)
            for row in series.itertuples():
                axis.annotate(
                    row.method,
                    (row.kv_bytes, row.quality),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        for row in rows[rows["kv_bytes"] == 0].itertuples():
            axis.axhline(row.quality, linestyle="--", color="grey", label=row.method)
        axis.set_xscale("log")
        axis.set_xlabel("KV cache bytes (log scale)")
        better = "higher" if rows["higher_is_better"].iloc[0] else "lower"
        axis.set_ylabel(f"{metric} ({better} is better)")
        axis.set_title(task)
        axis.legend(fontsize=7)
    figure.suptitle("Quality versus memory")
    figure.tight_layout()
    return figure
