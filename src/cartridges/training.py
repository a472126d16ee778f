"""Train a cartridge by context distillation: the model is frozen, only the KV prefix learns.

The student sees ``cartridge + conversation``; its next-token distributions at the teacher's
target positions are pulled towards the teacher's stored top-k distributions (the teacher saw
the chunk in context), so the teacher never runs during training.

One optimiser step consumes a global batch of rows. It is split over processes (data parallel,
``torch.distributed``) and over micro-batches (gradient accumulation); the loss is summed over
distilled positions and divided by the global count, so any split gives the same gradient as a
single process. Every ``checkpoint_every`` steps the cartridge, the optimiser and the step are
written atomically; a restarted run with the same inputs resumes from there and ends with the
same cartridge. Data order and the learning rate are pure functions of the seed and the step.

The loop trains a :class:`Student`: the frozen model plus trainable tensors in some form. The
cartridge is the method; a LoRA adapter (``cartridges.lora``) is the parameterisation ablation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch.utils.checkpoint import checkpoint
from transformers import Cache, PreTrainedModel

from cartridges.attention import ATTENTION_MODES, choose_attention
from cartridges.batching import Batch, Example, make_batch, plan_batches
from cartridges.cartridge import Cartridge
from cartridges.files import atomic_write
from cartridges.losses import kl_from_topk, topk_distillation_loss
from cartridges.modeling import sliding_window
from cartridges.prefix import forward_with_prefix, head_only_at
from cartridges.progress import progress_bar
from cartridges.target_store import example_lengths, prefetch

logger = logging.getLogger(__name__)

__all__ = [
    "CartridgeStudent",
    "Example",
    "Student",
    "TrainConfig",
    "evaluate_kl",
    "train",
    "train_cartridge",
]


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

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(
                "global_batch_size and micro_batch_size must be >= 1, got "
                f"{self.global_batch_size} and {self.micro_batch_size}."
            )
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}."
            )
        if self.mixed_precision not in ("none", "bfloat16"):
            raise ValueError(
                f"mixed_precision must be none or bfloat16, got {self.mixed_precision!r}."
            )
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}."
            )
        if self.pack_length is not None and self.pack_length < 0:
            raise ValueError(
                f"pack_length must be >= 0 (0 or null: no packing), got {self.pack_length}."
            )
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0, got {self.loss_chunk_size}.")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 when max_steps is not set, got {self.epochs}.")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per process per step; the global batch must split evenly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size={self.micro_batch_size} x {world_size} process(es) = {per_step}."
            )
        return self.global_batch_size // per_step


# --------------------------------------------------------------------------- helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def _epoch_plan(lengths: list[int], config: TrainConfig, epoch: int) -> list[list[list[int]]]:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    return plan_batches(lengths, config.global_batch_size, generator, config.pack_length)


def _batch_for_step(lengths, config, step, plans: dict[int, list]) -> list[list[int]]:
    """The global batch (rows of example indices) of an optimiser step."""
    epoch, index = 0, step
    while True:
        if epoch not in plans:
            plans[epoch] = _epoch_plan(lengths, config, epoch)
        if index < len(plans[epoch]):
            return plans[epoch][index]
        index -= len(plans[epoch])
        epoch += 1


def _loss_sum(
    model: PreTrainedModel,
    cartridge: Cartridge,
    batch: Batch,
    kl: bool = False,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Sum over the batch's distilled positions of the loss (or of the top-k KL)."""
    cache = cartridge.as_cache(batch.input_ids.shape[0], model.config)
    return loss_sum(model, cache, batch, kl, chunk_size)


def loss_sum(
    model: PreTrainedModel,
    cache: Cache | None,
    batch: Batch,
    kl: bool = False,
    chunk_size: int = 0,
) -> torch.Tensor:
    """The batch's summed loss (or top-k KL) with ``model`` reading ``cache`` as a prefix.

    With ``chunk_size`` smaller than the number of targets, the output head and the loss run a
    chunk of target positions at a time and are recomputed in the backward pass, so at most
    ``chunk_size x vocabulary`` logits exist at once instead of ``targets x vocabulary``.
    """
    loss_fn = kl_from_topk if kl else topk_distillation_loss
    if chunk_size and len(batch.rows) > chunk_size:
        return _chunked_loss_sum(model, cache, batch, loss_fn, chunk_size)
    with head_only_at(model, batch.rows, batch.columns):
        student = _forward(model, cache, batch).logits[0]  # [N, V]
    return loss_fn(student, batch.teacher_ids, batch.teacher_logprobs) * len(batch.rows)


def _forward(model: PreTrainedModel, cache: Cache | None, batch: Batch):
    return forward_with_prefix(
        model,
        cache,
        batch.input_ids,
        batch.attention_mask,
        use_cache=False,
        position_ids=batch.position_ids,
    )


def logit_postprocessing(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What causal LMs do to their head's output before returning logits (known conventions)."""
    config = config.get_text_config(decoder=True)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and later
    scale = getattr(config, "logit_scale", None)  # Cohere
    divisor = getattr(config, "logits_scaling", None)  # Granite

    def postprocess(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return postprocess


def _chunked_loss_sum(model, cache, batch: Batch, loss_fn, chunk_size: int) -> torch.Tensor:
    """The loss over chunks of target positions, each chunk's logits recomputed in backward.

    The model's forward still runs its own head at one target position; the chunked logits
    at that position must equal it, so a model whose logit post-processing is not reproduced
    here is refused rather than trained on wrong logits.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"Model '{model.name_or_path}' has no output embeddings (lm head).")
    captured: list[torch.Tensor] = []

    def capture(_module, args):
        captured.append(args[0][batch.rows, batch.columns])  # [N, H]
        return (captured[-1][:1].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        reference = _forward(model, cache, batch).logits[0, 0].detach()  # [V]
    finally:
        handle.remove()
    hidden = captured[-1]
    postprocess = logit_postprocessing(model.config)

    def chunk_loss(states, teacher_ids, teacher_logprobs):
        logits = postprocess(head(states))
        return loss_fn(logits, teacher_ids, teacher_logprobs) * len(states)

    with torch.no_grad():
        mine = postprocess(head(hidden[:1]))[0]
    if not torch.allclose(mine.float(), reference.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"Model '{model.name_or_path}' post-processes its logits in a way the chunked loss "
            "does not reproduce; set loss_chunk_size: 0 to compute the loss in one piece."
        )
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            chunk_loss,
            hidden[start:end],
            batch.teacher_ids[start:end],
            batch.teacher_logprobs[start:end],
            use_reentrant=False,
        )
    return total


class Student(Protocol):
    """What the loop trains: a frozen model plus trainable tensors, scored on a batch."""

    model: PreTrainedModel

    @property
    def prefix_len(self) -> int:
        """KV positions before each row's tokens (packed masks must let rows attend to them)."""
        ...

    def trainable(self) -> list[torch.Tensor]:
        """The tensors the optimiser updates (and checkpoints hold), in a fixed order."""
        ...

    def loss_sum(self, batch: Batch, kl: bool = False) -> torch.Tensor:
        """Sum over the batch's distilled positions of the loss (or of the top-k KL)."""
        ...


@dataclass
class CartridgeStudent:
    """The method: the frozen model reads a trainable cartridge before every conversation."""

    model: PreTrainedModel
    cartridge: Cartridge
    loss_chunk_size: int = 0

    def __post_init__(self) -> None:
        self.cartridge.to(self.model.device)

    @property
    def prefix_len(self) -> int:
        return self.cartridge.num_tokens

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.cartridge.parameters() if p.requires_grad]

    def loss_sum(self, batch: Batch, kl: bool = False) -> torch.Tensor:
        return _loss_sum(self.model, self.cartridge, batch, kl, self.loss_chunk_size)


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
    return choose_attention(student.model, config.attention) if config.pack_length else "dense"


@torch.no_grad()
def held_out_kl(
    student: Student, examples: Sequence[Example], batch_size: int, pad_token_id: int
) -> float:
    """Mean top-k KL from the teacher to the student per distilled position.

    Lazy examples are read a batch at a time, the next batch while this one computes.
    """
    total, count = 0.0, 0
    model = student.model
    chunks = [
        list(range(start, min(start + batch_size, len(examples))))
        for start in range(0, len(examples), batch_size)
    ]
    for chunk, loaded in zip(chunks, prefetch(examples, chunks), strict=True):
        plan = [[i] for i in chunk]
        batch = make_batch(loaded, plan, pad_token_id, student.prefix_len, model.dtype)
        batch = batch.to(model.device)
        total += student.loss_sum(batch, kl=True).item()
        count += len(batch.rows)
    return total / max(count, 1)


def evaluate_kl(
    model: PreTrainedModel,
    cartridge: Cartridge,
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
) -> float:
    """Mean top-k KL from the teacher to ``model + cartridge`` per distilled position."""
    return held_out_kl(CartridgeStudent(model, cartridge), examples, batch_size, pad_token_id)


# --------------------------------------------------------------------------- checkpoints
def run_key(config: TrainConfig, student: Student, examples: Sequence[Example]) -> str:
    """Identifies a run: a checkpoint is resumed only by a run with the same key.

    Lazy examples contribute their fingerprint (shard footers and samples, conversation ids
    and lengths), so that computing the key never reads every target from disk.
    """
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(type(student).__name__.encode())
    for tensor in student.trainable():
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[: 1 << 16])
    fingerprint = getattr(examples, "fingerprint", None)
    if fingerprint is not None:
        digest.update(fingerprint().encode())
    else:
        for example in examples:
            digest.update(example.token_ids.numpy().tobytes())
            digest.update(example.teacher_logprobs.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(directory: Path, key: str, step: int, student: Student, optimizer) -> None:
    """Atomically write everything needed to resume after ``step`` optimiser steps."""
    state = {
        "key": key,
        "step": step,
        "trainable": [tensor.detach().cpu() for tensor in student.trainable()],
        "optimizer": optimizer.state_dict(),
    }
    with atomic_write(directory / "state.pt") as temporary:
        torch.save(state, temporary)


def load_state(directory: Path, key: str, student: Student, optimizer) -> int:
    """Restore a matching checkpoint into ``student`` and ``optimizer``; return its step."""
    path = directory / "state.pt"
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["key"] != key:
        logger.warning("Ignoring checkpoint %s: it belongs to a different run.", path)
        return 0
    with torch.no_grad():
        for tensor, saved in zip(student.trainable(), state["trainable"], strict=True):
            tensor.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    logger.info("Resuming from %s at step %d", path, state["step"])
    return int(state["step"])


# --------------------------------------------------------------------------- the loop
def train_cartridge(
    model: PreTrainedModel,
    cartridge: Cartridge,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_token_id: int,
    checkpoint_dir: str | os.PathLike | None = None,
    held_out: Sequence[Example] = (),
    on_step: Callable[[dict[str, float], int], None] | None = None,
    on_eval: Callable[[Cartridge, int], None] | None = None,
) -> tuple[Cartridge, list[dict[str, float]]]:
    """Optimise the trainable part of ``cartridge``; return it and the per-step history.

    Args:
        model: the frozen model (its weights never receive gradients).
        cartridge: the initialised cartridge, trained in place.
        examples: conversations with teacher targets.
        config: optimisation settings.
        pad_token_id: filler id for padding (never attended to).
        checkpoint_dir: where to checkpoint and resume from (``None``: no checkpoints); each
            run (inputs and parameters) gets its own subdirectory, so runs never clobber.
        held_out: conversations for the periodic held-out KL.
        on_step: called with ``(metrics, step)`` after every step (rank 0 only), e.g. to log.
        on_eval: called with ``(cartridge, steps done)`` every ``eval_every`` steps (rank 0
            only), e.g. to log sample generations.
    """
    history = train(
        CartridgeStudent(model, cartridge, config.loss_chunk_size),
        examples,
        config,
        pad_token_id,
        checkpoint_dir,
        held_out,
        on_step,
        (lambda _student, step: on_eval(cartridge, step)) if on_eval is not None else None,
    )
    return cartridge, history


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

    Arguments as for :func:`train_cartridge`, with ``on_eval`` given the student.
    """
    if not examples:
        raise ValueError("No training conversations: the conversations table is empty.")
    rank, world_size = _world()
    accumulation = config.accumulation_steps(world_size)
    attention = _check_packing(student, config)
    model = student.model
    trainable = student.trainable()
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=0.0)
    plans: dict[int, list] = {}
    lengths = example_lengths(examples)  # planning reads no example
    rows_per_epoch = len(_epoch_plan(lengths, config, 0))
    total = config.max_steps or max(1, math.ceil(config.epochs * rows_per_epoch))
    key = run_key(config, student, examples)
    directory = Path(checkpoint_dir) / key if checkpoint_dir is not None else None
    start = load_state(directory, key, student, optimizer) if directory else 0
    autocast = (
        torch.autocast(model.device.type, dtype=torch.bfloat16)
        if config.mixed_precision == "bfloat16"
        else nullcontext()
    )
    history: list[dict[str, float]] = []

    def rows_of(step: int) -> list[list[int]]:
        return _batch_for_step(lengths, config, step, plans)[rank::world_size]

    # This process's examples of the coming steps, read ahead in the background.
    fetched = prefetch(
        examples, ([i for row in rows_of(s) for i in row] for s in range(start, total))
    )
    progress = progress_bar(range(start, total), desc="distill", unit="step", disable=rank != 0)
    for step in progress:
        started = time.perf_counter()  # waiting for data counts against tokens/s
        loaded = next(fetched)
        rows = rows_of(step)
        micro = [
            rows[i : i + config.micro_batch_size]
            for i in range(0, len(rows), config.micro_batch_size)
        ]
        micro += [[]] * (accumulation - len(micro))  # a short last batch: idle micro-steps
        batches = [
            make_batch(
                loaded,
                plan,
                pad_token_id,
                student.prefix_len,
                model.dtype,
                config.pack_length,
                attention,
            ).to(model.device)
            for plan in micro
            if plan
        ]
        counts = torch.tensor(
            [sum(len(b.rows) for b in batches), sum(b.num_tokens for b in batches)],
            dtype=torch.float64,
        )
        if world_size > 1:
            dist.all_reduce(counts)
        positions, tokens = max(counts[0].item(), 1.0), counts[1].item()
        lr = _lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        loss_total = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            with autocast:
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
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if not (torch.isfinite(loss_total) and torch.isfinite(grad_norm)):
            last = (
                f"{directory / 'state.pt'}"
                if directory and (directory / "state.pt").exists()
                else "none"
            )
            raise FloatingPointError(
                f"Non-finite loss ({loss_total.item()}) or gradient norm ({grad_norm.item()}) at "
                f"step {step}; the trainable tensors were not updated. Last good checkpoint: "
                f"{last}. Lower learning_rate or check the teacher targets."
            )
        optimizer.step()
        metrics = {
            "loss": loss_total.item(),
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
