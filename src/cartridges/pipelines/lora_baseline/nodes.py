"""Nodes of lora_baseline: the same conversations and targets -> a LoRA adapter and a report."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pandas as pd

from cartridges.cartridge import Cartridge
from cartridges.corpus import join_documents
from cartridges.distributed import process_group
from cartridges.evaluation import Method, Question, score_method
from cartridges.lora import (
    LoraStudent,
    adapter_files,
    lora_adapter,
    lora_config_for_budget,
    trainable_parameters,
)
from cartridges.modeling import load_model
from cartridges.params import (
    DistillTrainingParams,
    EvaluationParams,
    LoraBaselineParams,
    ModelParams,
    parse,
)
from cartridges.pipelines.distill_training.nodes import split_examples
from cartridges.tables import ShardedTable
from cartridges.training import evaluate_kl, held_out_kl, train

logger = logging.getLogger(__name__)


def _question_scores(
    answering_model,
    tokenizer,
    method: Method,
    questions: list[Question],
    params: EvaluationParams,
    system_text: str,
) -> dict[str, float]:
    """``{task: quality}`` of ``method`` on the evaluation questions (qa, log_perplexity)."""
    tasks = tuple(t for t in params.tasks if t in ("qa", "log_perplexity"))
    if not tasks or not questions:
        return {}
    config = dataclasses.replace(params.eval_config, tasks=tasks)
    rows = score_method(answering_model, tokenizer, method, questions, system_text, config)
    scores = {row["task"]: row["quality"] for row in rows}
    for row in rows:
        if row["task"] == "qa":
            scores["qa_exact_match"] = row["exact_match"]
    return scores


def train_lora_baseline(
    corpus: pd.DataFrame,
    questions: list[Question],
    cartridge: Cartridge,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    distill_params: DistillTrainingParams | dict[str, Any],
    params: LoraBaselineParams | dict[str, Any],
    evaluation_params: EvaluationParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
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
    distill_params = parse("distill_training", distill_params)
    params = parse("lora_baseline", params)
    evaluation_params, model = parse("evaluation", evaluation_params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    llm, tokenizer = load_model(model.name_or_path, model.dtype, model.device)
    cartridge.check_compatible(llm)
    training, held_out, _ = split_examples(
        conversations, teacher_logprobs, chunk_set, distill_params, tokenizer
    )
    config = params.train_config(distill_params.train)
    budget = trainable_parameters(cartridge)
    lora = lora_config_for_budget(llm, budget, params.target_modules)
    pad = tokenizer.pad_token_id or 0
    system_text = system_prompt.format(chunk=join_documents(list(corpus["text"])))
    with lora_adapter(llm, lora) as peft_model:
        student = LoraStudent(peft_model, config.loss_chunk_size)
        kl_before = held_out_kl(student, held_out, config.micro_batch_size, pad)
        with process_group(distill_params.distributed_backend):
            history = train(student, training, config, pad, checkpoint_dir=params.checkpoint_dir)
        kl_after = held_out_kl(student, held_out, config.micro_batch_size, pad)
        lora_parameters = sum(p.numel() for p in student.trainable())
        files = adapter_files(peft_model)
        nothing_before = Cartridge.empty_like(cartridge)  # conversations start the sequence
        scores = _question_scores(
            peft_model,
            tokenizer,
            Method("lora", "lora", nothing_before),
            questions,
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
            questions,
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
        "target_modules": list(params.target_modules),
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
