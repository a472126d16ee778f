"""The distillation objective: what a student is, and its loss on a batch of teacher targets.

A :class:`Student` is the frozen model plus trainable tensors in some form; the cartridge
(:class:`CartridgeStudent`) is the method, a LoRA adapter (``cartridges.lora``) the
parameterisation ablation. Both are scored by :func:`loss_sum`: the model reads the student's
prefix (if any) and the batch, and its next-token distributions at the teacher's target positions
are compared with the teacher's stored top-k. The output head and the loss can run a chunk of
positions at a time (:func:`logit_postprocessing` reproduces what models do to their head's
output), so the ``targets x vocabulary`` logits never exist at once. :func:`held_out_kl` is the
same objective measured as a KL on conversations the student does not train on.

How the objective is optimised (batching plan, accumulation, schedule, processes, checkpoints)
is the loop's business (``cartridges.training``), not this module's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Cache, PreTrainedModel

from cartridges.batching import Batch, Example, make_batch
from cartridges.cartridge import Cartridge, prefix_cache
from cartridges.losses import kl_from_topk, topk_distillation_loss
from cartridges.prefix import forward_with_prefix, head_only_at
from cartridges.target_store import prefetch

__all__ = [
    "CartridgeStudent",
    "Student",
    "evaluate_kl",
    "held_out_kl",
    "logit_postprocessing",
    "loss_sum",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    """The method: the frozen model reads a trainable cartridge before every conversation.

    With ``companions``, a ``companion_prob`` share of the training batches read the cartridge
    next to one of them (before or after it, chosen from the batch's content, so that a resumed
    or distributed run makes the same choices): trained alone, a cartridge learns to be the only
    thing in the cache, and other cartridges beside it at inference draw its attention away.
    Held-out KL is always measured on the cartridge alone.
    """

    model: PreTrainedModel
    cartridge: Cartridge
    loss_chunk_size: int = 0
    companions: tuple[Cartridge, ...] = ()
    companion_prob: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.cartridge.to(self.model.device)
        self.companions = tuple(c.to(self.model.device) for c in self.companions)

    @property
    def prefix_len(self) -> int:
        return self.cartridge.num_tokens

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.cartridge.parameters() if p.requires_grad]

    def loss_sum(self, batch: Batch, kl: bool = False) -> torch.Tensor:
        rows = batch.input_ids.shape[0]
        companion, first = self._companion(batch) if not kl else (None, False)
        if companion is None:
            cache = self.cartridge.as_cache(rows, self.model.config)
        else:
            parts = (companion, self.cartridge) if first else (self.cartridge, companion)
            cache = prefix_cache(parts, rows, self.model.config)
        return loss_sum(self.model, cache, batch, kl, self.loss_chunk_size)

    def _companion(self, batch: Batch) -> tuple[Cartridge | None, bool]:
        """This batch's companion (or none) and whether it goes first."""
        if not self.companions or not self.companion_prob:
            return None, False
        content = int(batch.input_ids.sum()) * 1_000_003 + batch.input_ids.numel()
        draw = random.Random(f"{self.seed}:{content}")
        if draw.random() >= self.companion_prob:
            return None, False
        return draw.choice(self.companions), draw.random() < 0.5


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


def _chunked_loss_sum(
    model: PreTrainedModel, cache: Cache | None, batch: Batch, loss_fn: LossFn, chunk_size: int
) -> torch.Tensor:
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
