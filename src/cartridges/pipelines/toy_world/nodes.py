"""Nodes of toy_world: parameters -> a pretrained toy-world model (not part of __default__)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.params import parse
from cartridges.toy_world.evaluate import evaluate_model
from cartridges.toy_world.pretrain import PretrainConfig, pretrain

logger = logging.getLogger(__name__)


def pretrain_toy_world(
    params: PretrainConfig | dict[str, Any],
) -> tuple[tuple[PreTrainedModel, PreTrainedTokenizerBase], dict[str, Any]]:
    """Pretrain the toy-world reader and measure it on fresh documents.

    Returns:
        ``toy_world_model`` (model, tokenizer) and ``toy_world_metrics`` (kedro-mlflow format).
    """
    config: PretrainConfig = parse("toy_world", params)
    model, tokenizer = pretrain(config)
    metrics = evaluate_model(model, tokenizer, n_questions=config.eval_questions)
    logger.info("Toy-world model: %s", metrics)
    return (model, tokenizer), {
        name: {"value": float(value), "step": config.steps} for name, value in metrics.items()
    }
