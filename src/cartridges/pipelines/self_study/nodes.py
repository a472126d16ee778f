"""Nodes of self_study: ``chunk_set`` -> ``conversations`` + ``teacher_logprobs``.

The node validates its parameter blocks, builds the configured backend from the registry
(``cartridges.synthesis.registry``) and runs ``cartridges.synthesis.runs.run_self_study``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cartridges.corpus_tables import chunk_coverage, report_coverage
from cartridges.modeling import load_tokenizer
from cartridges.params import ModelParams, SelfStudyParams, parse
from cartridges.synthesis.registry import build_backend
from cartridges.synthesis.runs import chunks_read, run_self_study
from cartridges.synthesis.self_study import SelfStudy
from cartridges.tables import ShardedTable


def synthesize_conversations(
    corpus: pd.DataFrame,
    chunk_set: pd.DataFrame,
    params: SelfStudyParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> tuple[ShardedTable, ShardedTable, dict[str, Any]]:
    """Run the two-bot self-study protocol over the chunks; resumes from its shards.

    Returns:
        ``conversations`` (one row per conversation) and ``teacher_logprobs`` (flat top-k
        rows), both lazy handles over the run's shard files, and ``self_study_metrics``
        (totals, kedro-mlflow format).
    """
    params, model = parse("self_study", params), parse("model", model)
    config = params.config(parse("system_prompt", system_prompt), model.chat_template_kwargs)
    backend = build_backend(params.backend, params.backend_settings, model)
    study = SelfStudy(backend, load_tokenizer(model.name_or_path), config)
    chunks = list(zip(chunk_set["chunk_id"], chunk_set["text"], strict=True))
    read = chunk_set.iloc[: chunks_read(config, len(chunk_set))]
    covered = report_coverage(
        chunk_coverage(corpus, read), "Self-study's chunks", params.min_coverage
    )
    conversations, targets, totals = run_self_study(
        study, chunks, params.shard_dir, backend.identity()
    )
    totals["coverage"] = covered
    return conversations, targets, {k: {"value": v, "step": 0} for k, v in totals.items()}
