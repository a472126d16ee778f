"""Turn training examples into model inputs: packed rows, or padded batches of similar length.

Packing puts several conversations in one fixed-length row. Every token may attend to the whole
cartridge and, causally, to the tokens of its own conversation, never to another conversation,
and each conversation's positions restart at ``p``. The mask says so either block-sparse (a
:class:`~cartridges.attention.PackedLayout`, attended through FlexAttention or its CPU
counterpart, cost linear in the row length) or as a dense 4D additive mask (the fallback for
models that cannot switch attention; cost quadratic). Both go through the standard
``attention_mask`` argument, so no modelling code is forked. Sliding-window layers ignore a
custom mask's window, so packing is refused for them when the row could exceed the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cartridges.attention import PackedLayout, segment_starts


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
    # [B, T] (padded); packed: [B, 1, T, p + T] additive, or a PackedLayout (block-sparse)
    attention_mask: torch.Tensor | PackedLayout
    position_ids: torch.Tensor | None  # [B, T] for packed rows; None lets the prefix derive them
    rows: torch.Tensor  # [N]
    columns: torch.Tensor  # [N]
    teacher_ids: torch.Tensor  # [N, K]
    teacher_logprobs: torch.Tensor  # [N, K]
    num_tokens: int

    def to(self, device: torch.device) -> Batch:
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor | PackedLayout) else value
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
    # First fit in O(n log n): a max-tree over every row's free space, rows not yet opened
    # holding a whole row, so the leftmost leaf with room is the first open row that fits, or
    # else the next new row (a scan of all open rows per example took minutes at 10^5 rows).
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    free = [row_length] * (2 * size)
    rows: list[list[int]] = []
    for index, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= length
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


def packed_batch(
    rows: Sequence[Sequence[Example]],
    row_length: int,
    prefix_len: int,
    pad_token_id: int,
    dtype: torch.dtype,
    attention: str = "dense",
) -> Batch:
    """Packed rows, block-diagonal causal after a shared ``prefix_len`` prefix.

    Args:
        attention: ``flex`` for a block-sparse :class:`PackedLayout` mask, ``dense`` for the
            ``[B, 1, T, p + T]`` additive mask in ``dtype``.
    """
    if attention not in ("flex", "dense"):
        raise ValueError(f"attention must be flex or dense for packed rows, got {attention!r}.")
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
    # Padding queries attend to the prefix only, so that no row of the softmax is empty.
    layout = PackedLayout(segment_starts(segments), prefix_len)
    targets = _targets(flat, row_of, offsets)
    return Batch(
        input_ids,
        layout if attention == "flex" else layout.dense(dtype),
        prefix_len + positions,
        *targets,
        num_tokens=int((segments >= 0).sum()),
    )


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    pack_length: int | None = None,
) -> list[list[list[int]]]:
    """One epoch's batches: each a list of rows, each row a list of example indices.

    Takes the examples' token counts only, so that planning reads no example from disk.
    Without packing, examples are sorted into length buckets (one example per row) so that
    little compute goes to padding; with packing, examples are shuffled then packed into rows.
    Batch order is shuffled either way. Deterministic for a given generator state.
    """
    lengths = [int(n) for n in lengths]
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if pack_length:
        packed = pack_rows([lengths[i] for i in order], pack_length)
        rows = [[order[i] for i in row] for row in packed]
    else:
        rows = [[i] for i in sorted(order, key=lambda i: lengths[i])]
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
    attention: str = "dense",
) -> Batch:
    """Materialise one planned batch (rows of example indices); ``attention`` as for packing."""
    if pack_length:
        rows = [[examples[i] for i in row] for row in plan]
        return packed_batch(rows, pack_length, prefix_len, pad_token_id, dtype, attention)
    return pad_batch([examples[row[0]] for row in plan], pad_token_id)
