"""Nodes of distill_training: conversations + teacher targets -> a trained ``cartridge``."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import mlflow
import pandas as pd
import torch

from cartridges.cartridge import Cartridge
from cartridges.chat import context_ids
from cartridges.corpus import join_documents
from cartridges.distributed import process_group
from cartridges.generation import generate
from cartridges.initialization import from_random_tokens, from_random_vectors, from_token_ids
from cartridges.modeling import load_model
from cartridges.params import DistillTrainingParams, ModelParams, parse
from cartridges.tables import ShardedTable
from cartridges.target_store import LazyExamples, select
from cartridges.targets import memorization_examples, one_hot, to_examples
from cartridges.training import evaluate_kl, train_cartridge

logger = logging.getLogger(__name__)


def _corpus_context(corpus: pd.DataFrame, tokenizer, system_prompt: str) -> tuple[list[int], str]:
    """Token ids of the corpus in context (what a cartridge replaces) and the corpus hash."""
    text = join_documents(list(corpus["text"]))
    return context_ids(tokenizer, system_prompt.format(chunk=text)), hashlib.sha256(
        text.encode()
    ).hexdigest()


def _initial(llm, tokenizer, context, sha256, p: int, params: DistillTrainingParams) -> Cartridge:
    frozen, how = params.num_frozen_tokens, params.initializer
    generator = torch.Generator().manual_seed(params.train.seed)
    if how == "random_tokens":
        return from_random_tokens(llm, tokenizer, p, frozen, generator)
    if how == "random_vectors":
        return from_random_vectors(llm, p, frozen, generator)
    if p > len(context):
        raise ValueError(
            f"num_cartridge_tokens={p} exceeds the {len(context)} tokens of the corpus in "
            "context; lower it or use initializer: random_tokens."
        )
    return from_token_ids(llm, context[:p], frozen, initializer="text", source_sha256=sha256)


def _load(model: ModelParams):
    return load_model(model.name_or_path, model.dtype, model.device)


def initialize_cartridge(
    corpus: pd.DataFrame,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> Cartridge:
    """Build the starting cartridge: by default the KV of the corpus's first p context tokens."""
    params, model = parse("distill_training", params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    llm, tokenizer = _load(model)
    context, sha256 = _corpus_context(corpus, tokenizer, system_prompt)
    return _initial(llm, tokenizer, context, sha256, params.cartridge_size(len(context)), params)


def split_examples(
    conversations, teacher_logprobs, chunk_set, params: DistillTrainingParams | dict, tokenizer
):
    """Training and held-out examples (and the held-out conversation ids) for ``objective``.

    With the catalog's shard handles the examples stay on disk: only an index is built here.
    """
    params = parse("distill_training", params)
    objective = params.objective
    examples = to_examples(conversations, teacher_logprobs, len(tokenizer))
    if isinstance(examples, LazyExamples):
        conversation_ids = examples.conversation_ids
    else:
        conversation_ids = list(
            conversations["conversation_id"][
                conversations["conversation_id"].isin(set(teacher_logprobs["conversation_id"]))
            ]
        )
    if objective == "cross_entropy":
        examples = one_hot(examples)
    order = list(range(len(examples)))
    random.Random(params.train.seed).shuffle(order)
    count = max(1, int(len(order) * params.held_out_fraction)) if len(order) > 1 else 0
    held_out, train = order[:count], order[count:]
    training = select(examples, train)
    if objective == "memorization":
        # The baseline trains on the raw chunks; held-out KL is still measured on conversations.
        chunks = tokenizer(list(chunk_set["text"]), add_special_tokens=False)["input_ids"]
        training = memorization_examples(chunks)
    return training, select(examples, held_out), [conversation_ids[i] for i in held_out]


def _conversation_rows(conversations, conversation_ids: list[str]) -> pd.DataFrame:
    """The rows of some conversations, by id and in that order (a filtered scan on disk)."""
    if isinstance(conversations, ShardedTable):
        conversations = conversations.filter_rows(
            "conversation_id",
            conversation_ids,
            ["conversation_id", "token_ids", "answer_start", "messages"],
        )
    return conversations.set_index("conversation_id").loc[conversation_ids]


def sample_generations(
    llm,
    tokenizer,
    conversations: pd.DataFrame | ShardedTable,
    conversation_ids: list[str],
    max_new_tokens: int,
) -> Callable[[Cartridge], str]:
    """A report writer: the cartridge's greedy answers to the first question of conversations.

    Reading a few answers next to the teacher's (which saw the chunk) shows early whether
    training goes somewhere a loss curve cannot tell, e.g. fluent but off-corpus answers.
    """
    rows = _conversation_rows(conversations, conversation_ids)
    prompts = [[int(t) for t in row.token_ids[: row.answer_start]] for row in rows.itertuples()]
    messages = [json.loads(row.messages) for row in rows.itertuples()]

    def report(cartridge: Cartridge) -> str:
        answers = generate(
            llm,
            prompts,
            prefix=cartridge,
            max_new_tokens=max_new_tokens,
            stop_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        sections = []
        for conversation, answer in zip(messages, answers, strict=True):
            text = tokenizer.decode(answer.token_ids, skip_special_tokens=True)
            sections.append(
                f"### Question\n{conversation[0]['content']}\n\n"
                f"### Teacher (chunk in context)\n{conversation[1]['content']}\n\n"
                f"### Cartridge (p={cartridge.num_tokens}, greedy)\n{text}\n"
            )
        return "\n---\n\n".join(sections)

    return report


def _train(
    llm,
    tokenizer,
    initial,
    train,
    held_out,
    held_out_ids,
    params: DistillTrainingParams,
    conversations,
):
    config = params.train
    pad = tokenizer.pad_token_id or 0
    count = params.eval_generations
    report = (
        sample_generations(
            llm, tokenizer, conversations, held_out_ids[:count], params.eval_max_new_tokens
        )
        if count and held_out_ids
        else None
    )

    def log_generations(cartridge: Cartridge, step: int) -> None:
        if report is not None and mlflow.active_run() is not None:
            path = f"generations/p{cartridge.num_tokens}/step_{step:06d}.md"
            mlflow.log_text(report(cartridge), path)

    def held_out_kl(cartridge: Cartridge) -> float:
        if not held_out:
            return float("nan")
        return evaluate_kl(llm, cartridge, held_out, config.micro_batch_size, pad)

    def log_step(metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is not None:
            prefix = f"distill_training.p{initial.num_tokens}"  # as training_metrics' prefix
            mlflow.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step=step)

    kl_before = held_out_kl(initial)
    with process_group(params.distributed_backend):
        cartridge, history = train_cartridge(
            llm,
            initial,
            train,
            config,
            pad,
            checkpoint_dir=params.checkpoint_dir,
            held_out=held_out,
            on_step=log_step,
            on_eval=log_generations,
        )
    kl_after = held_out_kl(cartridge)
    if not config.eval_every or len(history) % config.eval_every:
        log_generations(cartridge, len(history))
    logger.info(
        "p=%d: held-out top-k KL to the teacher %.4f initial -> %.4f trained",
        cartridge.num_tokens,
        kl_before,
        kl_after,
    )
    cartridge.info.extra.update(
        {
            "train_steps": len(history),
            "held_out_kl_initial": kl_before,
            "held_out_kl": kl_after,
            "held_out_conversations": held_out_ids,
        }
    )
    return cartridge, history, kl_before, kl_after


def distill_cartridge(
    initial: Cartridge,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
) -> tuple[Cartridge, dict[str, Any]]:
    """Train the cartridge on the teacher targets; hold some conversations out to measure KL.

    ``objective`` picks the targets: ``distillation`` (the teacher's top-k, the method),
    ``cross_entropy`` (the answer tokens only) or ``memorization`` (next-token prediction on
    the raw chunks); the last two are the paper's ablations.

    Returns:
        The trained ``cartridge`` and ``training_metrics`` in kedro-mlflow's history format.
    """
    params, model = parse("distill_training", params), parse("model", model)
    llm, tokenizer = _load(model)
    train, held_out, held_out_ids = split_examples(
        conversations, teacher_logprobs, chunk_set, params, tokenizer
    )
    cartridge, history, kl_before, kl_after = _train(
        llm, tokenizer, initial, train, held_out, held_out_ids, params, conversations
    )
    metrics = {
        "held_out_kl_initial": {"value": kl_before, "step": 0},
        "held_out_kl_final": {"value": kl_after, "step": len(history)},
    }
    if history:
        metrics["final_train_loss"] = {"value": history[-1]["loss"], "step": len(history)}
    return cartridge, metrics


def distill_cartridge_sweep(
    corpus: pd.DataFrame,
    chunk_set: pd.DataFrame,
    conversations: ShardedTable,
    teacher_logprobs: ShardedTable,
    params: DistillTrainingParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
    system_prompt: str,
) -> dict[str, Cartridge]:
    """Train one cartridge per ``sweep_compressions`` entry (p = n / c), for the size curve.

    Returns:
        ``cartridge_sweep``: ``{"p<p>": cartridge}`` (empty when no sweep is configured).
    """
    params, model = parse("distill_training", params), parse("model", model)
    system_prompt = parse("system_prompt", system_prompt)
    if not params.sweep_compressions:
        return {}
    llm, tokenizer = _load(model)
    context, sha256 = _corpus_context(corpus, tokenizer, system_prompt)
    train, held_out, held_out_ids = split_examples(
        conversations, teacher_logprobs, chunk_set, params, tokenizer
    )
    sweep = {}
    for compression in params.sweep_compressions:
        p = params.cartridge_size(len(context), compression)
        initial = _initial(llm, tokenizer, context, sha256, p, params)
        sweep[f"p{p}"] = _train(
            llm, tokenizer, initial, train, held_out, held_out_ids, params, conversations
        )[0]
    return sweep
