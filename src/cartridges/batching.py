"""Turn training examples into model inputs: packed rows, or padded batches of similar length.

Packing puts several conversations in one fixed-length row. Every token may attend to the whole
cartridge and, causally, to the tokens of its own conversation, never to another conversation:
a 4D additive attention mask says so, and each conversation's positions restart at ``p``. Models
accept such a mask through the standard ``attention_mask`` argument, so no modelling code is
forked. Sliding-window layers ignore a custom mask's window, so packing is refused for them when
the row could exceed the window; padded batches are used instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One conversation: its tokens and the teacher's top-k at the distilled positions."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [N] indices into token_ids of the distilled tokens
    teacher_ids: torch.Tensor  # [N, K]
    teacher_logprobs: torch.Tensor  # [N, K], -inf where padded


@dataclass
class Batch:
    """Model inputs plus flat teacher targets; ``rows``/``columns`` locate each target's logits."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] (padded) or [B, 1, T, p + T] additive (packed)
    position_ids: torch.Tensor | None  # [B, T] for packed rows; None lets the prefix derive them
    rows: torch.Tensor  # [N]
    columns: torch.Tensor  # [N]
    teacher_ids: torch.Tensor  # [N, K]
    teacher_logprobs: torch.Tensor  # [N, K]
    num_tokens: int

    def to(self, device: torch.device) -> Batch:
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        return Batch(**moved)


def _targets(examples: Sequence[Example], rows: Sequence[int], offsets: Sequence[int]):
    top_k = max(e.teacher_ids.shape[1] for e in examples)
    row_index, columns, ids, logprobs = [], [], [], []
    for example, row, offset in zip(examples, rows, offsets, strict=True):
        row_index.append(torch.full_like(example.positions, row))
        columns.append(offset + example.positions - 1)  # logits at i-1 predict token i
        pad = top_k - example.teacher_ids.shape[1]
        ids.append(torch.nn.functional.pad(example.teacher_ids, (0, pad)))
        logprobs.append(
            torch.nn.functional.pad(example.teacher_logprobs, (0, pad), value=-math.inf)
        )
    return torch.cat(row_index), torch.cat(columns), torch.cat(ids), torch.cat(logprobs)


def pad_batch(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad a batch of examples (one conversation per row)."""
    width = max(len(e.token_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.token_ids)] = example.token_ids
        attention_mask[row, : len(example.token_ids)] = 1
    rows, columns, ids, logprobs = _targets(examples, range(len(examples)), [0] * len(examples))
    return Batch(
        input_ids,
        attention_mask,
        None,
        rows,
        columns,
        ids,
        logprobs,
        int(attention_mask.sum()),
    )


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Greedy first-fit packing of examples (by index, in the given order) into rows."""
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} conversation(s) are longer than pack_length={row_length} tokens "
            f"(longest: {max(lengths)}); raise pack_length."
        )
    rows: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        for row, space in enumerate(free):
            if length <= space:
                rows[row].append(index)
                free[row] -= length
                break
        else:
            rows.append([index])
            free.append(row_length - length)
    return rows


def packed_batch(
    rows: Sequence[Sequence[Example]],
    row_length: int,
    prefix_len: int,
    pad_token_id: int,
    dtype: torch.dtype,
) -> Batch:
    """Packed rows with a block-diagonal causal mask after a shared ``prefix_len`` prefix."""
    batch = len(rows)
    input_ids = torch.full((batch, row_length), pad_token_id, dtype=torch.long)
    segments = torch.full((batch, row_length), -1, dtype=torch.long)  # -1: padding
    positions = torch.zeros((batch, row_length), dtype=torch.long)
    flat, row_of, offsets = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for s, example in enumerate(row):
            n = len(example.token_ids)
            input_ids[r, offset : offset + n] = example.token_ids
            segments[r, offset : offset + n] = s
            positions[r, offset : offset + n] = torch.arange(n)
            flat.append(example)
            row_of.append(r)
            offsets.append(offset)
            offset += n
    causal = positions[:, :, None] >= positions[:, None, :]  # [B, T, T]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    allowed = torch.cat(
        [torch.ones((batch, row_length, prefix_len), dtype=torch.bool), causal & same], dim=-1
    )
    # Padding queries attend to the prefix only, so that no row of the softmax is empty.
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
    targets = _targets(flat, row_of, offsets)
    return Batch(
        input_ids,
        mask,
        prefix_len + positions,
        *targets,
        num_tokens=int((segments >= 0).sum()),
    )


def plan_batches(
    examples: Sequence[Example],
    batch_size: int,
    generator: torch.Generator,
    pack_length: int | None = None,
) -> list[list[list[int]]]:
    """One epoch's batches: each a list of rows, each row a list of example indices.

    Without packing, examples are sorted into length buckets (one example per row) so that
    little compute goes to padding; with packing, examples are shuffled then packed into rows.
    Batch order is shuffled either way. Deterministic for a given generator state.
    """
    order = torch.randperm(len(examples), generator=generator).tolist()
    if pack_length:
        packed = pack_rows([len(examples[i].token_ids) for i in order], pack_length)
        rows = [[order[i] for i in row] for row in packed]
    else:
        rows = [[i] for i in sorted(order, key=lambda i: len(examples[i].token_ids))]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def make_batch(
    examples: Sequence[Example],
    plan: Sequence[Sequence[int]],
    pad_token_id: int,
    prefix_len: int,
    dtype: torch.dtype,
    pack_length: int | None = None,
) -> Batch:
    """Materialise one planned batch (rows of example indices)."""
    if pack_length:
        rows = [[examples[i] for i in row] for row in plan]
        return packed_batch(rows, pack_length, prefix_len, pad_token_id, dtype)
    return pad_batch([examples[row[0]] for row in plan], pad_token_id)
