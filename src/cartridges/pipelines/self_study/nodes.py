"""Nodes of self_study: ``chunk_set`` -> ``conversations`` + ``teacher_logprobs``."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import pandas as pd

from cartridges.modeling import load_model, load_tokenizer, model_fingerprint
from cartridges.params import ModelParams, SelfStudyParams, parse
from cartridges.synthesis.backends import LocalBackend
from cartridges.synthesis.self_study import SelfStudy, run_self_study
from cartridges.tables import ShardedTable

logger = logging.getLogger(__name__)


def _backend(params: SelfStudyParams, model: ModelParams):
    """The configured backend and a string that identifies it (part of the resume key)."""
    if params.backend == "local":
        llm, tokenizer = load_model(model.name_or_path, model.dtype, model.device)
        return LocalBackend(llm, tokenizer), f"local:{model.name_or_path}:{model_fingerprint(llm)}"
    from cartridges.synthesis.openai_backend import OpenAIBackend

    tokenizer = load_tokenizer(model.name_or_path)
    backend = OpenAIBackend(tokenizer, **asdict(params.openai))
    backend.verify_tokenizer()
    return backend, backend.identity()


def synthesize_conversations(
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
    config = params.config(parse("system_prompt", system_prompt))
    backend, backend_id = _backend(params, model)
    tokenizer = load_tokenizer(model.name_or_path)
    chunks = list(zip(chunk_set["chunk_id"], chunk_set["text"], strict=True))
    conversations, targets, totals = run_self_study(
        SelfStudy(backend, tokenizer, config), chunks, params.shard_dir, backend_id
    )
    logger.info(
        "Self-study: %d conversations, %d tokens, %d teacher entries, %d answers cut by the limit",
        *(
            int(totals[k])
            for k in ("conversations", "tokens", "teacher_entries", "truncated_answers")
        ),
    )
    metrics = {name: {"value": value, "step": 0} for name, value in totals.items()}
    return conversations, targets, metrics
