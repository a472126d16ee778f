"""Nodes of distill_training: conversations + teacher targets -> a trained ``cartridge``."""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import mlflow
import pandas as pd
import torch

from cartridges.cartridge import Cartridge
from cartridges.chat import context_ids
from cartridges.corpus import join_documents
from cartridges.distributed import process_group
from cartridges.initialization import from_random_tokens, from_random_vectors, from_token_ids
from cartridges.modeling import load_model
from cartridges.targets import to_examples
from cartridges.training import TrainConfig, evaluate_kl, train_cartridge

logger = logging.getLogger(__name__)


def initialize_cartridge(
    corpus: pd.DataFrame, params: dict[str, Any], model: dict[str, Any], system_prompt: str
) -> Cartridge:
    """Build the starting cartridge: by default the KV of the corpus's first p context tokens."""
    llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
    p, frozen, how = (
        params["num_cartridge_tokens"],
        params["num_frozen_tokens"],
        params["initializer"],
    )
    generator = torch.Generator().manual_seed(TrainConfig(**params["train"]).seed)
    if how == "random_tokens":
        return from_random_tokens(llm, tokenizer, p, frozen, generator)
    if how == "random_vectors":
        return from_random_vectors(llm, p, frozen, generator)
    if how != "text":
        raise ValueError(f"Unknown initializer {how!r}; use text, random_tokens or random_vectors.")
    text = join_documents(list(corpus["text"]))
    ids = context_ids(tokenizer, system_prompt.format(chunk=text))
    if p > len(ids):
        raise ValueError(
            f"num_cartridge_tokens={p} exceeds the {len(ids)} tokens of the corpus in context; "
            "lower it or use initializer: random_tokens."
        )
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    return from_token_ids(llm, ids[:p], frozen, initializer="text", source_sha256=sha256)


def distill_cartridge(
    initial: Cartridge,
    conversations: pd.DataFrame,
    teacher_logprobs: pd.DataFrame,
    params: dict[str, Any],
    model: dict[str, Any],
) -> tuple[Cartridge, dict[str, Any]]:
    """Train the cartridge on the teacher targets; hold some conversations out to measure KL.

    Returns:
        The trained ``cartridge`` and ``training_metrics`` in kedro-mlflow's history format.
    """
    llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
    config = TrainConfig(**params["train"])
    examples = to_examples(conversations, teacher_logprobs, len(tokenizer))
    random.Random(config.seed).shuffle(examples)
    count = max(1, int(len(examples) * params["held_out_fraction"])) if len(examples) > 1 else 0
    train, held_out = examples[count:], examples[:count]
    pad = tokenizer.pad_token_id or 0

    def held_out_kl(cartridge: Cartridge) -> float:
        if not held_out:
            return float("nan")
        return evaluate_kl(llm, cartridge, held_out, config.micro_batch_size, pad)

    def log_step(metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is not None:
            mlflow.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=step)

    kl_before = held_out_kl(initial)
    with process_group(params.get("distributed_backend", "gloo")):
        cartridge, history = train_cartridge(
            llm,
            initial,
            train,
            config,
            pad,
            checkpoint_dir=params.get("checkpoint_dir"),
            held_out=held_out,
            on_step=log_step,
        )
    kl_after = held_out_kl(cartridge)
    logger.info(
        "Held-out top-k KL to the teacher: %.4f initial -> %.4f trained", kl_before, kl_after
    )
    cartridge.info.extra.update({"train_steps": len(history), "held_out_kl": kl_after})
    metrics = {
        "held_out_kl_initial": {"value": kl_before, "step": 0},
        "held_out_kl_final": {"value": kl_after, "step": len(history)},
    }
    if history:
        metrics["final_train_loss"] = {"value": history[-1]["loss"], "step": len(history)}
    return cartridge, metrics
