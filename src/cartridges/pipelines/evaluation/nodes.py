"""Nodes of evaluation: catalog data and parameters in, one library call, the report out.

Choosing which catalog versions of the cartridge to compare is the pipeline's (it knows the
catalog); everything else, from the corpus in context to the scores, is
:func:`cartridges.evaluation.compare_methods`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cartridges import lineage
from cartridges.cartridge import Cartridge
from cartridges.datasets import CartridgeHistory
from cartridges.evaluation import Question, compare_methods, report_metrics
from cartridges.evaluation.plot import tradeoff_figure
from cartridges.modeling import load_model_from
from cartridges.params import EvaluationParams, ModelParams, parse
from cartridges.tables import ShardedTable


def evaluate_methods(
    corpus: pd.DataFrame,
    questions: list[Question],
    cartridge: Cartridge,
    cartridge_history: CartridgeHistory,
    cartridge_sweep: dict[str, Cartridge],
    document_cartridges: dict[str, Cartridge],
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
        document_cartridges: cartridges of one document each (``{document name: cartridge}``):
            each is scored on its own document's questions and, with ``compose``, their
            concatenation on the questions about any of them, next to ICL over those documents.
        conversations: self-study conversations; fidelity uses those held out of training.
        teacher_logprobs: where the assistant tokens of each conversation are.
        params: the ``evaluation`` parameters.

    Returns:
        ``evaluation_report`` and ``evaluation_metrics`` (kedro-mlflow format).
    """
    params, model = parse("evaluation", params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    llm, tokenizer = load_model_from(model)
    cartridges, versions = _select_cartridges(cartridge, cartridge_history, cartridge_sweep, params)
    report = compare_methods(
        llm,
        tokenizer,
        corpus,
        system_prompt,
        cartridges,
        questions,
        conversations,
        teacher_logprobs,
        params.eval_config,
        versions=versions,
        document_cartridges=document_cartridges,
        documents=params.documents,
        compose=params.compose,
        routing=params.routing,
        max_context_tokens=params.max_context_tokens,
        template_kwargs=model.chat_template_kwargs,
        results_dir=params.results_dir,
    )
    return report, report_metrics(report)


def _select_cartridges(
    latest: Cartridge,
    history: CartridgeHistory,
    sweep: dict[str, Cartridge],
    params: EvaluationParams,
) -> tuple[dict[str, Cartridge], dict[str, str]]:
    """The cartridges to compare by report name, and their versions.

    No ``cartridge_versions``: the catalog's cartridge, named ``cartridge``. Otherwise each listed
    version of the catalog's ``cartridge`` entry, named ``cartridge_p{p}`` (so sizes can be
    compared). With ``include_sweep``, the size sweep's too, named ``sweep_p{p}``.
    """
    listed = list(params.cartridge_versions)
    cartridges = {"cartridge": latest} if not listed else {}
    versions = {"cartridge": lineage.catalog_version(latest)} if not listed else {}
    for version in listed:
        loaded = history.load(version)
        name = "cartridge" if len(listed) == 1 else f"cartridge_p{loaded.num_tokens}"
        if name in cartridges:
            name = f"{name}_{version}"
        cartridges[name], versions[name] = loaded, version
    for name, swept in sweep.items() if params.include_sweep else ():
        cartridges[f"sweep_{name}"] = swept
        versions[f"sweep_{name}"] = lineage.catalog_version(swept)
    return cartridges, versions


def plot_tradeoff(evaluation_report: pd.DataFrame) -> tuple[Figure, Figure]:
    """The trade-off figure, once for each format the catalog saves (PNG, SVG)."""
    figure = tradeoff_figure(evaluation_report)
    return figure, figure
