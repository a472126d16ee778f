"""Distil a cartridge: train it on the teacher's targets and report how close it came.

Around the training loop (``cartridges.training``) this adds what a run of the method reports:
the held-out top-k KL to the teacher before and after, the per-step metrics, and the cartridge's
greedy answers to a few held-out questions next to the teacher's (handed to a :class:`RunLog`,
MLflow in the pipeline: reading them shows early whether training goes somewhere a loss curve
cannot tell, e.g. fluent but off-corpus answers). Also the size sweep: one cartridge per
compression ratio. The library tracks nothing itself; the caller decides where logs go.

How big the cartridge is, where it starts and which examples it sees: ``cartridges.recipe``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import pandas as pd
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import HELD_OUT_CONVERSATIONS, Cartridge
from cartridges.chat import TemplateKwargs
from cartridges.context import CorpusContext, corpus_context
from cartridges.corpus_tables import document_names
from cartridges.distributed import process_group
from cartridges.generation import default_stop_ids, generate
from cartridges.modeling import pad_token_id
from cartridges.objective import evaluate_kl
from cartridges.recipe import Companions, Recipe, Split, initial_cartridge, split_by_document
from cartridges.tables import ShardedTable
from cartridges.training import TrainConfig, planned_run, train_cartridge

logger = logging.getLogger(__name__)


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class DistillConfig(Recipe):
    """The recipe, the optimisation, what is reported on the way, and the size sweep."""

    sweep_compressions: list[Annotated[float, Field(ge=1)]] = field(
        default_factory=lambda: [2.0, 8.0, 16.0]
    )
    # One cartridge per document at p = n_document / c, each trained only on its own document's
    # conversations, to compose at inference; None: none.
    document_compression: Annotated[float, Field(ge=1)] | None = None
    # Where a document cartridge's companions (train.companion_prob) come from: "own" chunks of
    # its document, or "others": the other documents' chunks (distractor mixing, "Cartridges at
    # Scale"), so that it learns to answer about its document beside other documents' KV.
    document_companions: Literal["own", "others"] = "own"
    eval_generations: Annotated[int, Field(ge=0)] = 2  # held-out questions answered per eval
    eval_max_new_tokens: Annotated[int, Field(ge=1)] = 48
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed_backend: str = "gloo"  # nccl on GPUs
    checkpoint_dir: str | None = None  # None: no resumable checkpoints


class RunLog(Protocol):
    """Where a run's per-step metrics and sample answers go (the pipeline passes MLflow's)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_text(self, text: str, path: str) -> None: ...


@dataclass
class Distilled:
    """A trained cartridge, its per-step history and its held-out KL before and after."""

    cartridge: Cartridge
    history: list[dict[str, float]]
    held_out_kl_initial: float
    held_out_kl: float

    def metrics(self) -> dict[str, dict[str, float]]:
        """The run's summary metrics, as ``{name: {"value", "step"}}`` (MLflow's history form)."""
        steps = len(self.history)
        metrics = {
            "held_out_kl_initial": {"value": self.held_out_kl_initial, "step": 0},
            "held_out_kl_final": {"value": self.held_out_kl, "step": steps},
        }
        if self.history:
            metrics["final_train_loss"] = {"value": self.history[-1]["loss"], "step": steps}
        return metrics


def distill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    initial: Cartridge,
    split: Split,
    config: DistillConfig,
    conversations: pd.DataFrame | ShardedTable,
    run_log: RunLog | None = None,
    label: str | None = None,
    companions: Companions | None = None,
) -> Distilled:
    """Train ``initial`` (in place) on the split's training examples; measure the held-out KL.

    ``conversations`` give the held-out questions whose answers go to ``run_log`` with the
    per-step metrics, under ``label`` (default ``p<p>``); with ``train.companion_prob`` set,
    training reads the cartridge beside prefixes drawn from ``companions``. The cartridge's
    ``info.extra`` records the steps, the KL and the held-out conversations.
    """
    pad = pad_token_id(tokenizer)
    label = label or f"p{initial.num_tokens}"
    log_generations = _generations_logger(
        model, tokenizer, conversations, split, config, run_log, label
    )

    def held_out_kl(cartridge: Cartridge) -> float:
        if not split.held_out:
            return float("nan")
        return evaluate_kl(model, cartridge, split.held_out, config.train.micro_batch_size, pad)

    kl_before = held_out_kl(initial)
    train = config.train
    prefixes = []
    if train.companion_prob:
        if companions is None:
            raise ValueError("train.companion_prob is set: pass the corpus's chunks as companions.")
        prefixes = companions.prefixes(
            model, tokenizer, initial.num_tokens, train.companion_count, train.seed
        )
    with process_group(config.distributed_backend):
        cartridge, history = train_cartridge(
            model,
            initial,
            split.training,
            config.train,
            pad,
            checkpoint_dir=config.checkpoint_dir,
            companions=prefixes,
            held_out=split.held_out,
            on_step=_metrics_logger(f"distill_training.{label}", run_log),
            on_eval=log_generations,
        )
    kl_after = held_out_kl(cartridge)
    # All the run's steps: a resumed run's history holds only the last process's.
    steps, tokens = planned_run(config.train, split.training)
    every = config.train.eval_every
    if not every or steps % every:  # the last step was not an evaluation
        log_generations(cartridge, steps)
    logger.info(
        "p=%d: held-out top-k KL to the teacher %.4f initial -> %.4f trained",
        cartridge.num_tokens,
        kl_before,
        kl_after,
    )
    cartridge.info.extra.update(
        {
            "train_steps": steps,
            "train_tokens": tokens,
            "held_out_kl_initial": kl_before,
            "held_out_kl": kl_after,
            HELD_OUT_CONVERSATIONS: split.held_out_ids,
        }
    )
    return Distilled(cartridge, history, kl_before, kl_after)


def distill_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: CorpusContext,
    split: Split,
    config: DistillConfig,
    conversations: pd.DataFrame | ShardedTable,
    run_log: RunLog | None = None,
    companions: Companions | None = None,
) -> dict[str, Cartridge]:
    """One cartridge per ``sweep_compressions`` ratio (p = n / c), for the size curve.

    Returns:
        ``{"p<p>": cartridge}`` (empty when no sweep is configured).
    """
    sweep = {}
    for compression in config.sweep_compressions:
        initial = initial_cartridge(
            model, tokenizer, context, config, config.train.seed, compression
        )
        trained = distill(
            model, tokenizer, initial, split, config, conversations, run_log, None, companions
        )
        sweep[f"p{initial.num_tokens}"] = trained.cartridge
    return sweep


def distill_documents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: pd.DataFrame,
    chunk_set: pd.DataFrame,
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    config: DistillConfig,
    system_prompt: str,
    template_kwargs: TemplateKwargs = None,
    run_log: RunLog | None = None,
) -> dict[str, Cartridge]:
    """One cartridge per document, each as if its document were the whole corpus.

    A document's cartridge starts from that document in context, at ``document_compression``
    of its length, and trains only on the conversations about its own chunks, so composing two
    of them tests what the paper claims (cartridges trained separately answer together, without
    retraining). With ``train.companion_prob``, it is read beside companions: chunks of its own
    document, or with ``document_companions: others`` the other documents' (distractor mixing;
    their KV only, never their conversations).

    Returns:
        ``{document name: cartridge}`` (see :func:`cartridges.corpus.document_name`); empty when
        ``document_compression`` is unset.
    """
    if config.document_compression is None:
        return {}
    names = document_names(corpus)
    doc_ids = list(corpus["doc_id"])
    if config.document_companions == "others" and config.train.companion_prob and len(doc_ids) < 2:
        raise ValueError(
            "document_companions: others draws a document cartridge's companions from the other "
            f"documents, but the corpus has {len(doc_ids)}: use own, or a corpus of several."
        )
    splits = split_by_document(
        conversations, teacher_logprobs, chunk_set, config, config.train.seed, tokenizer, doc_ids
    )
    for name, doc_id in zip(names, doc_ids, strict=True):
        if doc_id not in splits:
            raise ValueError(
                f"Cannot train the cartridge of document {name}: no self-study conversation is "
                "about it. Draw more chunks (document_prep.chunking.num_chunks) or use "
                "chunking.method: structural, which covers every document."
            )
    cartridges = {}
    for name, doc_id, text in zip(names, doc_ids, corpus["text"], strict=True):
        context = corpus_context([text], tokenizer, system_prompt, template_kwargs)
        initial = initial_cartridge(
            model, tokenizer, context, config, config.train.seed, config.document_compression
        )
        split = splits[doc_id]
        logger.info(
            "Cartridge of document %s: p=%d, %d training conversations",
            name,
            initial.num_tokens,
            len(split.training),
        )
        mine = chunk_set["doc_id"] == doc_id
        source = mine if config.document_companions == "own" else ~mine
        companions = Companions(list(chunk_set.loc[source, "text"]), system_prompt, template_kwargs)
        trained = distill(
            model,
            tokenizer,
            initial,
            split,
            config,
            conversations,
            run_log,
            f"document_{name}",
            companions,
        )
        trained.cartridge.info.extra["document"] = name
        cartridges[name] = trained.cartridge
    return cartridges


def _metrics_logger(
    prefix: str, run_log: RunLog | None
) -> Callable[[dict[str, float], int], None] | None:
    """Per-step metrics under ``prefix`` (that of the run's ``training_metrics``)."""
    if run_log is None:
        return None

    def log_step(metrics: dict[str, float], step: int) -> None:
        run_log.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step)

    return log_step


def _generations_logger(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: pd.DataFrame | ShardedTable,
    split: Split,
    config: DistillConfig,
    run_log: RunLog | None,
    label: str,
) -> Callable[[Cartridge, int], None]:
    """Logs the cartridge's answers to the first ``eval_generations`` held-out questions."""
    chosen = split.held_out_ids[: config.eval_generations] if run_log is not None else []
    report = (
        sample_generations(model, tokenizer, conversations, chosen, config.eval_max_new_tokens)
        if chosen
        else None
    )

    def log_generations(cartridge: Cartridge, step: int) -> None:
        if report is not None:
            path = f"generations/{label}/step_{step:06d}.md"
            run_log.log_text(report(cartridge), path)

    return log_generations


def sample_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: pd.DataFrame | ShardedTable,
    conversation_ids: list[str],
    max_new_tokens: int,
) -> Callable[[Cartridge], str]:
    """A report writer: the cartridge's greedy answers to the first question of conversations."""
    rows = _conversation_rows(conversations, conversation_ids)
    prompts = [[int(t) for t in row.token_ids[: row.answer_start]] for row in rows.itertuples()]
    messages = [json.loads(row.messages) for row in rows.itertuples()]

    def report(cartridge: Cartridge) -> str:
        answers = generate(
            model,
            prompts,
            prefix=cartridge,
            max_new_tokens=max_new_tokens,
            stop_token_ids=default_stop_ids(model, tokenizer),
            pad_token_id=pad_token_id(tokenizer),
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


def _conversation_rows(conversations: Any, conversation_ids: list[str]) -> pd.DataFrame:
    """The rows of some conversations, by id and in that order (a filtered scan on disk)."""
    if isinstance(conversations, ShardedTable):
        conversations = conversations.filter_rows(
            "conversation_id",
            conversation_ids,
            ["conversation_id", "token_ids", "answer_start", "messages"],
        )
    return conversations.set_index("conversation_id").loc[conversation_ids]
