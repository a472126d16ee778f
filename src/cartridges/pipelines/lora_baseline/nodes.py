"""Nodes of lora_baseline: the same conversations and targets -> a LoRA adapter and a report."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from cartridges.cartridge import Cartridge
from cartridges.corpus import join_documents
from cartridges.distributed import process_group
from cartridges.evaluation import EvalConfig, Method, load_questions, score_method
from cartridges.lora import (
    LoraStudent,
    adapter_files,
    lora_adapter,
    lora_config_for_budget,
    trainable_parameters,
)
from cartridges.modeling import load_model
from cartridges.pipelines.distill_training.nodes import split_examples
from cartridges.training import TrainConfig, evaluate_kl, held_out_kl, train

logger = logging.getLogger(__name__)


def _question_scores(
    answering_model, tokenizer, method: Method, params: dict[str, Any], system_text: str
) -> dict[str, float]:
    """``{task: quality}`` of ``method`` on the evaluation questions (qa, log_perplexity)."""
    tasks = tuple(t for t in params.get("tasks", ()) if t in ("qa", "log_perplexity"))
    if not tasks or not params.get("questions_path"):
        return {}
    config = EvalConfig(
        tasks=tasks,
        max_new_tokens=params.get("max_new_tokens", 24),
        batch_size=params.get("batch_size", 16),
    )
    questions = load_questions(params["questions_path"])
    rows = score_method(answering_model, tokenizer, method, questions, system_text, config)
    scores = {row["task"]: row["quality"] for row in rows}
    for row in rows:
        if row["task"] == "qa":
            scores["qa_exact_match"] = row["exact_match"]
    return scores


def train_lora_baseline(
    corpus: pd.DataFrame,
    cartridge: Cartridge,
    chunk_set: pd.DataFrame,
    conversations: pd.DataFrame,
    teacher_logprobs: pd.DataFrame,
    distill_params: dict[str, Any],
    params: dict[str, Any],
    evaluation_params: dict[str, Any],
    model: dict[str, Any],
    system_prompt: str,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Train a LoRA adapter with no more parameters than ``cartridge`` on the same data and loss.

    The training and held-out conversations are split exactly as distill_training split them,
    so the held-out KL of the adapter and of the cartridge are measured on the same set. Both
    then answer the evaluation questions: the cartridge after its KV, the adapter with nothing
    before the conversation, exactly as each was trained.

    Returns:
        ``lora_baseline`` (the adapter's files, as ``PeftModel.from_pretrained`` reads them) and
        ``lora_baseline_report`` (sizes, held-out KL and question scores of both).
    """
    llm, tokenizer = load_model(model["name_or_path"], model["dtype"], model["device"])
    cartridge.check_compatible(llm)
    training, held_out, _ = split_examples(
        conversations, teacher_logprobs, chunk_set, distill_params, tokenizer
    )
    config = TrainConfig(**{**distill_params["train"], **(params.get("train") or {})})
    budget = trainable_parameters(cartridge)
    lora = lora_config_for_budget(llm, budget, params["target_modules"])
    pad = tokenizer.pad_token_id or 0
    system_text = system_prompt.format(chunk=join_documents(list(corpus["text"])))
    with lora_adapter(llm, lora) as peft_model:
        student = LoraStudent(peft_model, config.loss_chunk_size)
        kl_before = held_out_kl(student, held_out, config.micro_batch_size, pad)
        with process_group(distill_params.get("distributed_backend", "gloo")):
            history = train(
                student, training, config, pad, checkpoint_dir=params.get("checkpoint_dir")
            )
        kl_after = held_out_kl(student, held_out, config.micro_batch_size, pad)
        lora_parameters = sum(p.numel() for p in student.trainable())
        files = adapter_files(peft_model)
        nothing_before = Cartridge.empty_like(cartridge)  # conversations start the sequence
        scores = _question_scores(
            peft_model,
            tokenizer,
            Method("lora", "lora", nothing_before),
            evaluation_params,
            system_text,
        )
    # The adapter is gone from the shared model: the cartridge is scored on the plain model.
    scores = {
        "lora": scores,
        "cartridge": _question_scores(
            llm,
            tokenizer,
            Method("cartridge", "cartridge", cartridge),
            evaluation_params,
            system_text,
        ),
    }
    cartridge_kl = evaluate_kl(llm, cartridge, held_out, config.micro_batch_size, pad)
    logger.info(
        "Held-out top-k KL: LoRA r=%d (%d parameters) %.4f -> %.4f; cartridge p=%d (%d) %.4f",
        lora.r,
        lora_parameters,
        kl_before,
        kl_after,
        cartridge.num_tokens,
        budget,
        cartridge_kl,
    )
    report = {
        "lora_rank": lora.r,
        "target_modules": list(params["target_modules"]),
        "lora_trainable_parameters": lora_parameters,
        "cartridge_tokens": cartridge.num_tokens,
        "cartridge_trainable_parameters": budget,
        "train_steps": len(history),
        "learning_rate": config.learning_rate,
        "held_out_conversations": len(held_out),
        "held_out_kl_lora_initial": kl_before,
        "held_out_kl_lora": kl_after,
        "held_out_kl_cartridge": cartridge_kl,
        "question_scores": scores,
    }
    return files, report
