"""Nodes of distill_training: conversations + teacher targets -> a trained ``cartridge``.

Each node validates its parameter blocks, loads the model and calls the library: the size, start
and split come from ``cartridges.recipe``, the corpus in context from ``cartridges.context``,
the training run from ``cartridges.distillation``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from transformers import PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge
from cartridges.context import CorpusContext, corpus_context
from cartridges.distillation import RunLog, distill, distill_documents, distill_sweep
from cartridges.modeling import load_model_from
from cartridges.params import DistillTrainingParams, ModelParams, parse
from cartridges.recipe import Companions, Split, initial_cartridge, split_examples
from cartridges.tables import ShardedTable


def initialize_cartridge(
    corpus: pd.DataFrame,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> Cartridge:
    """Build the starting cartridge: by default the KV of the corpus's first p context tokens."""
    params, model, system_prompt = _parse(params, model, system_prompt)
    llm, tokenizer = load_model_from(model)
    context = _context(corpus, tokenizer, system_prompt, model)
    return initial_cartridge(llm, tokenizer, context, params, params.train.seed)


def distill_cartridge(
    initial: Cartridge,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> tuple[Cartridge, dict[str, Any]]:
    """Train the cartridge on the teacher targets; hold some conversations out to measure KL.

    ``objective`` picks the targets: ``distillation`` (the teacher's top-k, the method),
    ``cross_entropy`` (the answer tokens only) or ``memorization`` (next-token prediction on
    the raw chunks); the last two are the paper's ablations.

    Returns:
        The trained ``cartridge`` and ``training_metrics`` in kedro-mlflow's history format.
    """
    params, model, system_prompt = _parse(params, model, system_prompt)
    llm, tokenizer = load_model_from(model)
    split, companions = _training_set(
        conversations, teacher_logprobs, chunk_set, params, model, system_prompt, tokenizer
    )
    distilled = distill(
        llm, tokenizer, initial, split, params, conversations, _run_log(), None, companions
    )
    return distilled.cartridge, distilled.metrics()


def distill_cartridge_sweep(
    corpus: pd.DataFrame,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> dict[str, Cartridge]:
    """Train one cartridge per ``sweep_compressions`` entry (p = n / c), for the size curve.

    Returns:
        ``cartridge_sweep``: ``{"p<p>": cartridge}`` (empty when no sweep is configured).
    """
    params, model, system_prompt = _parse(params, model, system_prompt)
    if not params.sweep_compressions:
        return {}
    llm, tokenizer = load_model_from(model)
    context = _context(corpus, tokenizer, system_prompt, model)
    split, companions = _training_set(
        conversations, teacher_logprobs, chunk_set, params, model, system_prompt, tokenizer
    )
    return distill_sweep(
        llm, tokenizer, context, split, params, conversations, _run_log(), companions
    )


def distill_document_cartridges(
    corpus: pd.DataFrame,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> dict[str, Cartridge]:
    """With ``document_compression`` set, one cartridge per document, each trained only on its
    own document's conversations (to be composed at inference).

    Returns:
        ``document_cartridges``: ``{document name: cartridge}`` (empty when not asked for).
    """
    params, model, system_prompt = _parse(params, model, system_prompt)
    if params.document_compression is None:
        return {}
    llm, tokenizer = load_model_from(model)
    return distill_documents(
        llm,
        tokenizer,
        corpus,
        chunk_set,
        conversations,
        teacher_logprobs,
        params,
        system_prompt,
        model.chat_template_kwargs,
        _run_log(),
    )


def _parse(
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> tuple[DistillTrainingParams, ModelParams, str]:
    """Every node's parameter blocks, checked."""
    return (
        parse("distill_training", params),
        parse("model", model),
        parse("system_prompt", system_prompt),
    )


def _context(
    corpus: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, system_prompt: str, model: ModelParams
) -> CorpusContext:
    """The whole corpus in context, as the cartridge stands in for it."""
    return corpus_context(
        list(corpus["text"]), tokenizer, system_prompt, model.chat_template_kwargs
    )


def _training_set(
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    chunk_set: pd.DataFrame,
    params: DistillTrainingParams,
    model: ModelParams,
    system_prompt: str,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[Split, Companions]:
    """The examples split into training and held-out, and the chunks they train beside."""
    split = split_examples(
        conversations, teacher_logprobs, chunk_set, params, params.train.seed, tokenizer
    )
    companions = Companions(list(chunk_set["text"]), system_prompt, model.chat_template_kwargs)
    return split, companions


class _MlflowRunLog:
    """Per-step metrics and sample answers into the active MLflow run (kedro-mlflow's)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_text(self, text: str, path: str) -> None:
        mlflow.log_text(text, path)


def _run_log() -> RunLog | None:
    """MLflow's run when one is active (under ``kedro run``), else nothing is logged."""
    return _MlflowRunLog() if mlflow.active_run() is not None else None
