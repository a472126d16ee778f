"""Nodes of self_study: ``chunk_set`` -> ``conversations`` + ``teacher_logprobs``."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from cartridges.modeling import load_model
from cartridges.synthesis.self_study import LocalSelfStudy, SelfStudyConfig
from cartridges.targets import to_tables

logger = logging.getLogger(__name__)


def synthesize_conversations(
    chunk_set: pd.DataFrame, params: dict[str, Any], model: dict[str, Any], system_prompt: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the two-bot self-study protocol over the chunks with the local model.

    Returns:
        ``conversations`` (one row per conversation) and ``teacher_logprobs`` (flat top-k rows).
    """
    config = SelfStudyConfig(**params, system_prompt=system_prompt)
    llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
    chunks = list(zip(chunk_set["chunk_id"], chunk_set["text"], strict=True))
    conversations, targets = to_tables(LocalSelfStudy(llm, tokenizer, config).run(chunks))
    logger.info(
        "Self-study: %d conversations, %d tokens, %d teacher entries, %d answers cut by the limit",
        len(conversations),
        conversations["num_tokens"].sum(),
        len(targets),
        conversations["answer_truncated"].sum(),
    )
    return conversations, targets
