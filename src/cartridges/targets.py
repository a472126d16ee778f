"""Tables of conversations and flat teacher top-k targets, and their way back to tensors.

Teacher targets are stored flat, one row per kept top-k entry: ``(conversation_id, position,
token_id, logprob)``. Positions index the conversation's ``token_ids``; a position may keep
fewer than k entries (the cut at ``min_prob_mass``), so the flat form wastes nothing.

Tables on disk (:class:`~cartridges.tables.ShardedTable`) become lazily read examples
(:mod:`cartridges.target_store`); DataFrames, for small data and tests, become dense tensors at
once. Both give the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cartridges.batching import Example
from cartridges.tables import ShardedTable

CONVERSATION_COLUMNS = [
    "conversation_id",
    "chunk_id",
    "seed_type",
    "seed_prompt",
    "messages",
    "token_ids",
    "answer_start",
    "answer_truncated",
    "num_tokens",
]
TARGET_COLUMNS = ["conversation_id", "position", "token_id", "logprob"]


class TargetsError(ValueError):
    """Conversations and teacher targets that cannot be trained on."""


def dense_examples(
    conversations: pd.DataFrame, teacher_logprobs: pd.DataFrame, vocab_size: int
) -> list[Example]:
    """Training examples of tables held in memory, refusing tables that do not belong together
    (:func:`cartridges.target_store.to_examples` reads shard folders lazily instead)."""
    if conversations.empty:
        raise TargetsError("The conversations table is empty: run self_study first.")
    if teacher_logprobs.empty:
        raise TargetsError("The teacher_logprobs table is empty: no teacher target to train on.")
    known = set(conversations["conversation_id"])
    orphans = set(teacher_logprobs["conversation_id"].unique()) - known
    if orphans:
        raise TargetsError(
            f"teacher_logprobs refers to {len(orphans)} conversation(s) missing from "
            f"conversations (e.g. {sorted(orphans)[:3]}): the two tables come from different runs."
        )
    largest = int(teacher_logprobs["token_id"].max())
    if largest >= vocab_size or int(teacher_logprobs["token_id"].min()) < 0:
        raise TargetsError(
            f"Teacher token id {largest} is outside the student's vocabulary of {vocab_size}: the "
            "conversations were synthesised with a different tokenizer than the student model's."
        )
    grouped = {cid: group for cid, group in teacher_logprobs.groupby("conversation_id", sort=False)}
    examples = []
    for row in conversations.itertuples(index=False):
        group = grouped.get(row.conversation_id)
        if group is None:
            continue
        token_ids = torch.tensor(np.asarray(row.token_ids, dtype=np.int64))
        positions, ids, logprobs = _dense_targets(group)
        if int(positions.max()) >= len(token_ids) or int(positions.min()) < 1:
            raise TargetsError(
                f"Conversation {row.conversation_id} has targets at positions outside its "
                f"{len(token_ids)} tokens."
            )
        examples.append(Example(token_ids, positions, ids, logprobs))
    return examples


def _dense_targets(group: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dense_targets(
        group["position"].to_numpy(), group["token_id"].to_numpy(), group["logprob"].to_numpy()
    )


def dense_targets(
    position: np.ndarray, token_id: np.ndarray, logprob: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N]`` positions and ``[N, K]`` ids / logprobs, padded with -inf log-probabilities.

    Entries of one position keep their stored order (the teacher's, most probable first).
    """
    positions, inverse = np.unique(position, return_inverse=True)
    counts = np.bincount(inverse)
    width = int(counts.max()) if len(counts) else 0
    ids = np.zeros((len(positions), width), dtype=np.int64)
    logprobs = np.full((len(positions), width), -math.inf, dtype=np.float32)
    order = np.argsort(inverse, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    ids[inverse[order], slot] = token_id[order]
    logprobs[inverse[order], slot] = logprob[order]
    return (
        torch.from_numpy(positions.astype(np.int64)),
        torch.from_numpy(ids),
        torch.from_numpy(logprobs),
    )


def one_hot(examples: Sequence[Example]) -> Sequence[Example]:
    """The same positions with the actual next token as the only target (token cross-entropy).

    With a one-hot teacher the distillation loss is exactly the cross-entropy of the answer
    tokens: the ablation that distillation is compared with. Lazy examples stay lazy.
    """
    if hasattr(examples, "as_one_hot"):
        return examples.as_one_hot()
    return [
        Example(
            e.token_ids,
            e.positions,
            e.token_ids[e.positions][:, None],
            torch.zeros((len(e.positions), 1)),
        )
        for e in examples
    ]


def memorization_examples(token_ids: list[list[int]]) -> list[Example]:
    """Next-token prediction on raw corpus chunks: the "memorisation" baseline of the paper."""
    examples = []
    for ids in token_ids:
        if len(ids) < 2:
            continue
        tokens = torch.tensor(ids, dtype=torch.long)
        positions = torch.arange(1, len(ids))
        examples.append(
            Example(tokens, positions, tokens[1:, None], torch.zeros((len(ids) - 1, 1)))
        )
    if not examples:
        raise TargetsError("No corpus chunk has two tokens or more to memorise.")
    return examples


def unsure_conversations(
    teacher_logprobs: pd.DataFrame | ShardedTable, min_confidence: float, batch_rows: int = 1 << 20
) -> set[str]:
    """The conversations in which the teacher, at some answer token, gave its most likely token
    less than ``min_confidence`` probability: it was guessing, most often because the question
    asks about something its chunk does not hold.

    A table on disk is scanned a batch at a time (three columns); a conversation's rows may span
    batches and shards, so the rows of the last conversation of a batch wait for the next one.
    """
    if min_confidence <= 0:
        return set()
    threshold = math.log(min_confidence)
    columns = ["conversation_id", "position", "logprob"]
    if not isinstance(teacher_logprobs, ShardedTable):
        return _unsure(_plain_ids(pa.Table.from_pandas(teacher_logprobs[columns])), threshold)
    unsure: set[str] = set()
    pending = None
    for batch in teacher_logprobs.iter_batches(columns=columns, batch_size=batch_rows):
        table = _plain_ids(pa.Table.from_batches([batch]))
        if pending is not None:
            table = pa.concat_tables([pending, table.cast(pending.schema)])
        ids = table.column("conversation_id")
        last = ids[len(ids) - 1]
        tail = pc.index(pc.equal(ids, last), True).as_py()  # rows are grouped by conversation
        unsure |= _unsure(table.slice(0, tail), threshold)
        pending = table.slice(tail)
    if pending is not None:
        unsure |= _unsure(pending, threshold)
    return unsure


def _plain_ids(rows: pa.Table) -> pa.Table:
    """``rows`` with conversation ids as plain strings: shards may dictionary-encode them, each
    with its own dictionary, and tables with different dictionaries do not concatenate."""
    ids = rows.column("conversation_id")
    if pa.types.is_dictionary(ids.type):
        rows = rows.set_column(0, "conversation_id", ids.cast(ids.type.value_type))
    return rows


def _unsure(rows: pa.Table, threshold: float) -> set[str]:
    """Conversations of ``rows`` whose least confident position's best log-probability is under
    ``threshold``."""
    if rows.num_rows == 0:
        return set()
    best = rows.group_by(["conversation_id", "position"]).aggregate([("logprob", "max")])
    least = best.group_by("conversation_id").aggregate([("logprob_max", "min")])
    low = least.filter(pc.less(least.column("logprob_max_min"), threshold))
    return set(low.column("conversation_id").to_pylist())
