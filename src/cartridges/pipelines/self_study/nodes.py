"""Nodes of self_study: ``chunk_set`` -> ``conversations`` + ``teacher_logprobs``."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from cartridges.modeling import load_model, load_tokenizer, model_fingerprint
from cartridges.synthesis.backends import LocalBackend
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig, run_self_study

logger = logging.getLogger(__name__)

_NOT_CONFIG = ("backend", "openai", "shard_dir")


def _backend(params: dict[str, Any], model: dict[str, Any]):
    """The configured backend and a string that identifies it (part of the resume key)."""
    kind = params.get("backend", "local")
    if kind == "local":
        llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
        return LocalBackend(
            llm, tokenizer
        ), f"local:{model['name_or_path']}:{model_fingerprint(llm)}"
    if kind == "openai":
        from cartridges.synthesis.openai_backend import OpenAIBackend

        tokenizer = load_tokenizer(model["name_or_path"])
        backend = OpenAIBackend(tokenizer, **params["openai"])
        backend.verify_tokenizer()
        return backend, f"openai:{backend.model}"
    raise ValueError(f"Unknown self_study.backend {kind!r}; use 'local' or 'openai'.")


def synthesize_conversations(
    chunk_set: pd.DataFrame, params: dict[str, Any], model: dict[str, Any], system_prompt: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run the two-bot self-study protocol over the chunks; resumes from its shards.

    Returns:
        ``conversations`` (one row per conversation), ``teacher_logprobs`` (flat top-k rows)
        and ``self_study_metrics`` (totals, kedro-mlflow format).
    """
    config = SelfStudyConfig(
        **{k: v for k, v in params.items() if k not in _NOT_CONFIG}, system_prompt=system_prompt
    )
    backend, backend_id = _backend(params, model)
    tokenizer = load_tokenizer(model["name_or_path"])
    chunks = list(zip(chunk_set["chunk_id"], chunk_set["text"], strict=True))
    conversations, targets, totals = run_self_study(
        SelfStudy(backend, tokenizer, config), chunks, params["shard_dir"], backend_id
    )
    logger.info(
        "Self-study: %d conversations, %d tokens, %d teacher entries, %d answers cut by the limit",
        *(
            int(totals[k])
            for k in ("conversations", "tokens", "teacher_entries", "truncated_answers")
        ),
    )
    metrics = {f"self_study.{name}": {"value": value, "step": 0} for name, value in totals.items()}
    return conversations, targets, metrics
