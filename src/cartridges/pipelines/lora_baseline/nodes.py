"""Nodes of lora_baseline: the same conversations and targets -> a LoRA adapter and a report.

The node validates its parameter blocks, loads the model, takes distill_training's split
(``cartridges.recipe``) and the corpus in context (``cartridges.context``), and runs
``cartridges.lora_baseline.compare_with_lora``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cartridges.cartridge import Cartridge
from cartridges.context import corpus_context
from cartridges.evaluation import Question
from cartridges.lora_baseline import Questions, compare_with_lora
from cartridges.modeling import load_model_from
from cartridges.params import (
    DistillTrainingParams,
    EvaluationParams,
    LoraBaselineParams,
    ModelParams,
    parse,
)
from cartridges.recipe import split_examples
from cartridges.tables import ShardedTable


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

    The held-out conversations are the ones the cartridge records (distill_training's), so the
    held-out KL of the adapter and of the cartridge are measured on the same set even when the
    parameters changed since.

    Returns:
        ``lora_baseline`` (the adapter's files, as ``PeftModel.from_pretrained`` reads them) and
        ``lora_baseline_report`` (sizes, held-out KL and question scores of both).
    """
    distill_params = parse("distill_training", distill_params)
    params = parse("lora_baseline", params)
    evaluation_params, model = parse("evaluation", evaluation_params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    llm, tokenizer = load_model_from(model)
    seed, switches = distill_params.train.seed, model.chat_template_kwargs
    split = split_examples(  # held out: the conversations the cartridge records
        conversations,
        teacher_logprobs,
        chunk_set,
        distill_params,
        seed,
        tokenizer,
        held_out_ids=cartridge.info.held_out_conversations,
    )
    context = corpus_context(list(corpus["text"]), tokenizer, system_prompt, switches)
    asked = Questions(questions, evaluation_params.eval_config, context.system_text, switches)
    settings = params.settings(distill_params)
    return compare_with_lora(llm, tokenizer, cartridge, split, settings, asked)
