"""Train a cartridge by context distillation: the model is frozen, only the KV prefix learns.

The student sees ``cartridge + conversation``; its next-token distributions at the teacher's
target positions are pulled towards the teacher's stored top-k distributions (the teacher saw
the chunk in context). Conversations are batched by length (sorted into buckets, then the
buckets shuffled) so that little compute goes to padding.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cartridges.cartridge import Cartridge
from cartridges.losses import kl_from_topk, topk_distillation_loss
from cartridges.prefix import forward_with_prefix

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation parameters (``conf/base/parameters_distill_training.yml``)."""

    learning_rate: float = 2e-2
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}."
            )
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 when max_steps is not set, got {self.epochs}.")


@dataclass
class Example:
    """One conversation: its tokens and the teacher's top-k at the distilled positions."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [N] indices into token_ids of the distilled tokens
    teacher_ids: torch.Tensor  # [N, K]
    teacher_logprobs: torch.Tensor  # [N, K], -inf where padded


def collate(examples: Sequence[Example], pad_token_id: int, device: torch.device):
    """Right-pad a batch; return inputs and the flat teacher targets with their logit rows."""
    width = max(len(e.token_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, columns, ids, logprobs = [], [], [], []
    top_k = max(e.teacher_ids.shape[1] for e in examples)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.token_ids)] = example.token_ids
        attention_mask[row, : len(example.token_ids)] = 1
        rows.append(torch.full_like(example.positions, row))
        columns.append(example.positions - 1)  # logits at i-1 predict token i
        pad = top_k - example.teacher_ids.shape[1]
        ids.append(torch.nn.functional.pad(example.teacher_ids, (0, pad)))
        logprobs.append(
            torch.nn.functional.pad(example.teacher_logprobs, (0, pad), value=-math.inf)
        )
    return (
        input_ids.to(device),
        attention_mask.to(device),
        torch.cat(rows).to(device),
        torch.cat(columns).to(device),
        torch.cat(ids).to(device),
        torch.cat(logprobs).to(device),
    )


def distillation_forward(
    model: PreTrainedModel, cartridge: Cartridge, batch, kl: bool = False
) -> torch.Tensor:
    """The distillation loss (or the top-k KL) of one collated batch."""
    input_ids, attention_mask, rows, columns, teacher_ids, teacher_logprobs = batch
    cache = cartridge.as_cache(input_ids.shape[0], model.config)
    logits = forward_with_prefix(model, cache, input_ids, attention_mask).logits  # [B, T, V]
    student = logits[rows, columns]  # [N, V]
    loss_fn = kl_from_topk if kl else topk_distillation_loss
    return loss_fn(student, teacher_ids, teacher_logprobs)


def length_bucketed_batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Batches of similar-length examples, in random order (indices into ``examples``)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].token_ids), rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_kl(
    model: PreTrainedModel,
    cartridge: Cartridge,
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
) -> float:
    """Mean top-k KL from the teacher to ``model + cartridge`` over ``examples``."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_token_id, model.device)
        positions = len(batch[2])
        total += distillation_forward(model, cartridge, batch, kl=True).item() * positions
        count += positions
    return total / max(count, 1)


def train_cartridge(
    model: PreTrainedModel,
    cartridge: Cartridge,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_token_id: int,
    on_step: Callable[[dict[str, float], int], None] | None = None,
) -> tuple[Cartridge, list[dict[str, float]]]:
    """Optimise the trainable part of ``cartridge`` on ``examples``; return it and the history.

    Args:
        model: the frozen model (its weights never receive gradients).
        cartridge: the initialised cartridge, trained in place.
        examples: conversations with teacher targets.
        config: optimisation settings.
        pad_token_id: filler id for padding (never attended to).
        on_step: called with ``(metrics, step)`` after every optimiser step, e.g. to log them.
    """
    if not examples:
        raise ValueError("No training conversations: the conversations table is empty.")
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    cartridge.to(model.device)
    trainable = [p for p in cartridge.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=0.0)
    history, batches = [], []
    progress = tqdm(range(total), desc="distill", unit="step")
    for step in progress:
        if not batches:
            batches = length_bucketed_batches(examples, config.batch_size, rng)
        batch = collate([examples[i] for i in batches.pop()], pad_token_id, model.device)
        started = time.perf_counter()
        lr = _lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = distillation_forward(model, cartridge, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite loss {loss.item()} at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        tokens = int(batch[1].sum())
        metrics = {
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }
        history.append(metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if on_step is not None:
            on_step(metrics, step)
    return cartridge, history
