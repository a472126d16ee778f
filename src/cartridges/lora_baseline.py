"""The LoRA baseline: an adapter of a cartridge's size, trained and judged like the cartridge.

The paper's parameterisation ablation. The adapter trains no more parameters than the cartridge
(``cartridges.lora`` picks the rank), on the same training examples with the same loss and the
same held-out conversations (the split of ``cartridges.recipe``), so held-out KL compares like
with like. Both then answer the evaluation questions: the cartridge after its KV, the adapter
with nothing before the conversation, exactly as each was trained.

Building the adapter and its student is ``cartridges.lora``'s part; the loop is
``cartridges.training``'s; this module runs the comparison and writes its report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge
from cartridges.chat import TemplateKwargs
from cartridges.distributed import process_group
from cartridges.evaluation import EvalConfig, Method, Question, question_scores
from cartridges.lora import (
    LoraStudent,
    adapter_files,
    lora_adapter,
    lora_config_for_budget,
    trainable_parameters,
)
from cartridges.modeling import pad_token_id
from cartridges.objective import evaluate_kl, held_out_kl
from cartridges.recipe import Split
from cartridges.training import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """How the adapter is trained: where it goes in the model, and the loop's settings."""

    target_modules: Sequence[str]
    train: TrainConfig
    distributed_backend: str = "gloo"
    checkpoint_dir: str | None = None  # None: no resumable checkpoints


@dataclass(frozen=True)
class Questions:
    """What both methods are asked, and how: the question set, the settings, the system text."""

    questions: Sequence[Question]
    config: EvalConfig
    system_text: str  # the corpus in context (``cartridges.context``), for the tasks that use it
    template_kwargs: TemplateKwargs = None


def compare_with_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cartridge: Cartridge,
    split: Split,
    settings: LoraSettings,
    questions: Questions,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Train an adapter of ``cartridge``'s size on ``split``; compare the two.

    Returns:
        The adapter's files (as ``PeftModel.from_pretrained`` reads them) and a report: sizes,
        held-out KL of both, and their question scores.
    """
    cartridge.check_compatible(model)
    config, pad = settings.train, pad_token_id(tokenizer)
    budget = trainable_parameters(cartridge)
    adapter = _train_adapter(model, tokenizer, cartridge, split, settings, questions)
    # The adapter is gone from the shared model: the cartridge is scored on the plain model.
    method = Method("cartridge", "cartridge", cartridge)
    cartridge_scores = _question_scores(model, tokenizer, method, questions)
    cartridge_kl = evaluate_kl(model, cartridge, split.held_out, config.micro_batch_size, pad)
    logger.info(
        "Held-out top-k KL: LoRA r=%d (%d parameters) %.4f -> %.4f; cartridge p=%d (%d) %.4f",
        adapter.rank,
        adapter.parameters,
        adapter.kl_initial,
        adapter.kl,
        cartridge.num_tokens,
        budget,
        cartridge_kl,
    )
    report = {
        "lora_rank": adapter.rank,
        "target_modules": list(settings.target_modules),
        "lora_trainable_parameters": adapter.parameters,
        "cartridge_tokens": cartridge.num_tokens,
        "cartridge_trainable_parameters": budget,
        "train_steps": adapter.steps,
        "learning_rate": config.learning_rate,
        "held_out_conversations": len(split.held_out),
        "held_out_kl_lora_initial": adapter.kl_initial,
        "held_out_kl_lora": adapter.kl,
        "held_out_kl_cartridge": cartridge_kl,
        "question_scores": {"lora": adapter.scores, "cartridge": cartridge_scores},
    }
    return adapter.files, report


@dataclass
class _Adapter:
    """A trained adapter's files and what was measured of it."""

    rank: int
    parameters: int
    steps: int
    kl_initial: float
    kl: float
    files: dict[str, bytes]
    scores: dict[str, float]


def _train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cartridge: Cartridge,
    split: Split,
    settings: LoraSettings,
    questions: Questions,
) -> _Adapter:
    """Train, measure and save an adapter within ``cartridge``'s budget; then remove it."""
    config, pad = settings.train, pad_token_id(tokenizer)
    if config.companion_prob:
        logger.warning("The adapter trains alone: train.companion_prob applies to cartridges only.")
    lora = lora_config_for_budget(model, trainable_parameters(cartridge), settings.target_modules)
    with lora_adapter(model, lora) as peft_model:
        student = LoraStudent(peft_model, config.loss_chunk_size)
        kl_before = held_out_kl(student, split.held_out, config.micro_batch_size, pad)
        with process_group(settings.distributed_backend):
            history = train(
                student, split.training, config, pad, checkpoint_dir=settings.checkpoint_dir
            )
        nothing_before = Cartridge.empty_like(cartridge)  # conversations start the sequence
        return _Adapter(
            rank=lora.r,
            parameters=sum(p.numel() for p in student.trainable()),
            steps=len(history),
            kl_initial=kl_before,
            kl=held_out_kl(student, split.held_out, config.micro_batch_size, pad),
            files=adapter_files(peft_model),
            scores=_question_scores(
                peft_model, tokenizer, Method("lora", "lora", nothing_before), questions
            ),
        )


def _question_scores(
    answering_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    asked: Questions,
) -> dict[str, float]:
    """Scores of ``method`` on the selected tasks that need only the questions (the adapter has
    no held-out conversations of its own): ``{task: quality, "<task>_<metric>": value}``."""
    return question_scores(
        answering_model,
        tokenizer,
        method,
        asked.questions,
        asked.system_text,
        asked.config,
        asked.template_kwargs,
    )
