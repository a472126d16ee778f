"""Train a cartridge by context distillation: the model is frozen, only the KV prefix learns.

The student sees ``cartridge + conversation``; its next-token distributions at the teacher's
target positions are pulled towards the teacher's stored top-k distributions (the teacher saw
the chunk in context), so the teacher never runs during training.

This module is the optimisation loop. One optimiser step consumes a global batch of rows. It is
split over processes (data parallel, ``torch.distributed``) and over micro-batches (gradient
accumulation); the loss is summed over distilled positions and divided by the global count, so
any split gives the same gradient as a single process. Every ``checkpoint_every`` steps the
trainable tensors, the optimiser and the step are saved (``cartridges.train_state``); a
restarted run with the same inputs resumes from there and ends with the same result. Data order
and the learning rate (``cartridges.schedule``) are pure functions of the seed and the step.

The loop trains any :class:`~cartridges.objective.Student` (the frozen model plus trainable
tensors) on its loss; the objective itself, and the held-out KL, live in
``cartridges.objective``. The cartridge is the method; a LoRA adapter (``cartridges.lora``) is
the parameterisation ablation.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TypedDict, Unpack

import torch
import torch.distributed as dist
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedModel

from cartridges.attention import ATTENTION_MODES, choose_attention, describe
from cartridges.batching import Batch, Example, make_batch, plan_batches
from cartridges.cartridge import Cartridge
from cartridges.checks import Problems
from cartridges.distributed import world
from cartridges.modeling import sliding_window
from cartridges.objective import CartridgeStudent, Student, held_out_kl
from cartridges.progress import progress_bar
from cartridges.schedule import SHAPES, lr_at
from cartridges.storage import Location
from cartridges.target_store import example_lengths, prefetch
from cartridges.train_state import load_state, run_key, save_state, saved_state

logger = logging.getLogger(__name__)

__all__ = ["LoopOptions", "TrainConfig", "train", "train_cartridge"]


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Optimisation parameters (``conf/base/parameters_distill_training.yml``)."""

    learning_rate: float = 2e-2
    global_batch_size: int = 8  # rows per optimiser step, over all processes
    micro_batch_size: int = 8  # rows per forward pass in one process
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    max_grad_norm: float = 1.0
    pack_length: int | None = None  # tokens per packed row; None: padded length buckets
    attention: str = "auto"  # packed rows: auto | flex (block-sparse) | dense (4D mask)
    mixed_precision: str = "none"  # none | bfloat16 (autocast; the cartridge stays float32)
    loss_chunk_size: int = 2048  # target positions per head + loss chunk (0: all at once)
    checkpoint_every: int = 50
    eval_every: int = 0  # held-out KL every N steps (0: only at the end)
    seed: int = 0
    # Share of micro-batches in which the cartridge is read next to a companion prefix (the KV
    # of a chunk of its own corpus, before or after it), so that it keeps working beside other
    # cartridges when composed; 0: never (the paper's method). Padded batches only.
    companion_prob: float = 0.0
    companion_count: int = 4  # distinct companions (each holds the cartridge's p tokens of KV)

    def __post_init__(self) -> None:
        problems = Problems()
        problems.require(
            self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}."
        )
        problems.require(
            self.global_batch_size >= 1 and self.micro_batch_size >= 1,
            "global_batch_size and micro_batch_size must be >= 1, got "
            f"{self.global_batch_size} and {self.micro_batch_size}.",
        )
        problems.require(
            self.max_steps is None or self.max_steps >= 1,
            f"max_steps must be null (train for `epochs`) or >= 1, got {self.max_steps}.",
        )
        problems.require(
            self.max_steps is not None or self.epochs > 0,
            f"epochs must be > 0 when max_steps is not set, got {self.epochs}.",
        )
        problems.require(
            self.lr_schedule in SHAPES,
            f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}.",
        )
        problems.require(
            self.mixed_precision in ("none", "bfloat16"),
            f"mixed_precision must be none or bfloat16, got {self.mixed_precision!r}.",
        )
        problems.require(
            self.attention in ATTENTION_MODES,
            f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}.",
        )
        problems.require(
            self.pack_length is None or self.pack_length >= 0,
            f"pack_length must be >= 0 (0 or null: no packing), got {self.pack_length}.",
        )
        problems.at_least(self, 0, "loss_chunk_size")
        problems.require(
            0.0 <= self.companion_prob <= 1.0,
            f"companion_prob must be in [0, 1], got {self.companion_prob}.",
        )
        problems.at_least(self, 1, "companion_count")
        problems.require(
            not (self.companion_prob and self.pack_length),
            "companion_prob needs padded batches (pack_length: null): a companion changes "
            "the prefix length that packed rows' positions and masks are built for.",
        )
        problems.raise_any()

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per process per step; the global batch must split evenly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size={self.micro_batch_size} x {world_size} process(es) = {per_step}."
            )
        return self.global_batch_size // per_step


class _DataOrder:
    """Which examples each step reads: a pure function of the seed, the epoch and the step.

    Each epoch is planned from the examples' token counts alone (no example is read), with a
    generator seeded by the seed and the epoch; each process takes every ``world_size``-th row
    of the step's global batch.
    """

    def __init__(self, lengths: list[int], config: TrainConfig, rank: int, world_size: int):
        self.lengths, self.config = lengths, config
        self.rank, self.world_size = rank, world_size
        self._plans: dict[int, list[list[list[int]]]] = {}

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The global batches of ``epoch``, each a list of rows of example indices."""
        if epoch not in self._plans:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._plans[epoch] = plan_batches(
                self.lengths, self.config.global_batch_size, generator, self.config.pack_length
            )
        return self._plans[epoch]

    def total_steps(self) -> int:
        """``max_steps``, or as many steps as ``epochs`` of the first epoch's plan."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        return max(1, math.ceil(self.config.epochs * len(self.epoch(0))))

    def rows(self, step: int) -> list[list[int]]:
        """This process's rows of the global batch of optimiser step ``step``."""
        epoch, index = 0, step
        while index >= len(self.epoch(epoch)):
            index -= len(self.epoch(epoch))
            epoch += 1
        return self.epoch(epoch)[index][self.rank :: self.world_size]

    def indices(self, step: int) -> list[int]:
        """The examples this process reads at ``step``, in row order."""
        return [i for row in self.rows(step) for i in row]


def _check_packing(student: Student, config: TrainConfig) -> str:
    """Refuse packing a sliding window would cut; return the packed rows' attention mode."""
    window = sliding_window(student.model.config)
    if (
        config.pack_length
        and window is not None
        and student.prefix_len + config.pack_length > window
    ):
        raise ValueError(
            f"Packing rows of {config.pack_length} tokens after a {student.prefix_len}-token "
            f"cartridge exceeds the model's sliding window ({window}); a packed attention mask "
            "cannot express the window. Set pack_length: null to batch by length instead."
        )
    if not config.pack_length:
        return "dense"
    attention = choose_attention(student.model, config.attention)
    logger.info(
        "Packed rows of %d tokens attend by %s",
        config.pack_length,
        describe(attention, student.model),
    )
    return attention


def _micro_batches(
    student: Student,
    loaded: Sequence[Example],
    rows: list[list[int]],
    config: TrainConfig,
    pad_token_id: int,
    attention: str,
) -> list[Batch]:
    """This process's rows of a step as micro-batches on the model's device.

    A short last global batch gives a process fewer (or no) micro-batches: idle micro-steps.
    """
    model = student.model
    return [
        make_batch(
            loaded,
            rows[start : start + config.micro_batch_size],
            pad_token_id,
            student.prefix_len,
            model.dtype,
            config.pack_length,
            attention,
        ).to(model.device)
        for start in range(0, len(rows), config.micro_batch_size)
    ]


def _autocast(model: PreTrainedModel, config: TrainConfig) -> AbstractContextManager:
    if config.mixed_precision == "bfloat16":
        return torch.autocast(model.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _accumulate(
    student: Student,
    trainable: list[torch.Tensor],
    batches: list[Batch],
    config: TrainConfig,
    world_size: int,
) -> tuple[torch.Tensor, float]:
    """Accumulate the step's gradient over micro-batches and processes; return (loss, tokens).

    Each micro-batch's summed loss is divided by the distilled positions of the whole global
    batch, so the gradient does not depend on how the batch was split.
    """
    counts = torch.tensor(
        [sum(len(b.rows) for b in batches), sum(b.num_tokens for b in batches)],
        dtype=torch.float64,
    )
    if world_size > 1:
        dist.all_reduce(counts)
    positions, tokens = max(counts[0].item(), 1.0), counts[1].item()
    loss_total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with _autocast(student.model, config):
            loss = student.loss_sum(batch) / positions
        loss.backward()
        loss_total += loss.detach().double().cpu()
    for parameter in trainable:
        if parameter.grad is None:  # this process had no rows in this step
            parameter.grad = torch.zeros_like(parameter)
    if world_size > 1:
        for parameter in trainable:
            dist.all_reduce(parameter.grad)
        dist.all_reduce(loss_total)
    return loss_total, tokens


def _check_finite(
    loss: torch.Tensor, grad_norm: torch.Tensor, step: int, directory: Location | None
) -> None:
    """Stop before a non-finite step updates the trainable tensors, naming what to resume."""
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        return
    last = saved_state(directory) or "none"
    raise FloatingPointError(
        f"Non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at "
        f"step {step}; the trainable tensors were not updated. Last good checkpoint: "
        f"{last}. Lower learning_rate or check the teacher targets."
    )


class LoopOptions(TypedDict, total=False):
    """Optional arguments of :func:`train` that :func:`train_cartridge` passes through."""

    checkpoint_dir: str | os.PathLike | None
    held_out: Sequence[Example]
    on_step: Callable[[dict[str, float], int], None] | None


def planned_run(config: TrainConfig, examples: Sequence[Example]) -> tuple[int, int]:
    """The optimiser steps a run takes in all, and the conversation tokens it reads over them
    (each time an example is read), however many times it was resumed."""
    lengths = example_lengths(examples)
    order = _DataOrder(lengths, config, 0, 1)
    steps = order.total_steps()
    return steps, sum(lengths[i] for step in range(steps) for i in order.indices(step))


def train_cartridge(
    model: PreTrainedModel,
    cartridge: Cartridge,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_token_id: int,
    *,
    companions: Sequence[Cartridge] = (),
    on_eval: Callable[[Cartridge, int], None] | None = None,
    **options: Unpack[LoopOptions],
) -> tuple[Cartridge, list[dict[str, float]]]:
    """Optimise the trainable part of ``cartridge`` in place; return it and the per-step history.

    Arguments as for :func:`train`, with the frozen ``model`` and the initialised ``cartridge``
    as the student, ``companions`` the frozen prefixes it is read beside in a
    ``config.companion_prob`` share of the micro-batches, and ``on_eval`` given the cartridge.
    """
    if config.companion_prob and not companions:
        raise ValueError("companion_prob is set but no companion prefix was given.")
    student = CartridgeStudent(
        model,
        cartridge,
        config.loss_chunk_size,
        companions=tuple(companions) if config.companion_prob else (),
        companion_prob=config.companion_prob,
        seed=config.seed,
    )
    on_student = (lambda _student, step: on_eval(cartridge, step)) if on_eval is not None else None
    return cartridge, train(student, examples, config, pad_token_id, on_eval=on_student, **options)


def train(
    student: Student,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_token_id: int,
    checkpoint_dir: str | os.PathLike | None = None,
    held_out: Sequence[Example] = (),
    on_step: Callable[[dict[str, float], int], None] | None = None,
    on_eval: Callable[[Student, int], None] | None = None,
) -> list[dict[str, float]]:
    """Optimise ``student.trainable()`` in place on the teacher targets; return the history.

    The loop reads top to bottom as one optimiser step (data, rate, gradient, update, then
    evaluation, reporting and checkpoint), so it is kept in one piece.

    Args:
        student: the frozen model plus the tensors to train (the model never gets gradients).
        examples: conversations with teacher targets.
        config: optimisation settings.
        pad_token_id: filler id for padding (never attended to).
        checkpoint_dir: where to checkpoint and resume from (``None``: no checkpoints); each
            run (inputs and parameters) gets its own subdirectory, so runs never clobber.
        held_out: conversations for the periodic held-out KL.
        on_step: called with ``(metrics, step)`` after every step (rank 0 only), e.g. to log.
        on_eval: called with ``(student, steps done)`` every ``eval_every`` steps (rank 0
            only), e.g. to log sample generations.
    """
    if not examples:
        raise ValueError("No training conversations: the conversations table is empty.")
    rank, world_size = world()
    config.accumulation_steps(world_size)  # refuses a global batch that does not split evenly
    attention = _check_packing(student, config)
    trainable = student.trainable()
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=0.0)
    order = _DataOrder(example_lengths(examples), config, rank, world_size)
    total = order.total_steps()
    key = run_key(config, student, examples)
    directory = Location.of(checkpoint_dir) / key if checkpoint_dir is not None else None
    start = load_state(directory, key, student, optimizer) if directory else 0
    history: list[dict[str, float]] = []
    # This process's examples of the coming steps, read ahead in the background.
    fetched = prefetch(examples, (order.indices(step) for step in range(start, total)))
    progress = progress_bar(range(start, total), desc="distill", unit="step", disable=rank != 0)
    for step in progress:
        started = time.perf_counter()  # waiting for data counts against tokens/s
        batches = _micro_batches(
            student, next(fetched), order.rows(step), config, pad_token_id, attention
        )
        lr = lr_at(step, total, config.learning_rate, config.warmup_steps, config.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        loss, tokens = _accumulate(student, trainable, batches, config, world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        _check_finite(loss, grad_norm, step, directory)
        optimizer.step()
        metrics = {
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and rank == 0:
            if held_out:
                metrics["held_out_kl"] = held_out_kl(
                    student, held_out, config.micro_batch_size, pad_token_id
                )
            if on_eval is not None:
                on_eval(student, done)
        history.append(metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)  # drawn with the bar
        if on_step is not None and rank == 0:
            on_step(metrics, step)
        if directory and rank == 0 and (done % config.checkpoint_every == 0 or done == total):
            save_state(directory, key, done, student, optimizer)
    return history
