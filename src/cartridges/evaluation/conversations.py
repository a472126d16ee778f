"""Held-out conversations: the self-study conversations no evaluated cartridge trained on.

Fidelity is measured on them. Which ones are held out is recorded by training in each
cartridge (``info.extra["held_out_conversations"]``); the assistant positions are where
self-study recorded teacher targets. Tables on disk are scanned for the wanted rows only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from cartridges.cartridge import Cartridge
from cartridges.chat import Message
from cartridges.tables import ShardedTable

logger = logging.getLogger(__name__)


@dataclass
class HeldOutConversation:
    """A synthetic conversation the cartridges were not trained on.

    Attributes:
        conversation_id: its id in the ``conversations`` table.
        messages: the turns, for rendering without a system message (no context).
        token_ids: the tokens after the system message (the student's view).
        positions: indices into ``token_ids`` of the assistant's tokens.
    """

    conversation_id: str
    messages: list[Message]
    token_ids: list[int]
    positions: list[int]


def held_out_ids(cartridges: Mapping[str, Cartridge]) -> list[str] | None:
    """Conversations no cartridge trained on; ``None`` (all) when one does not say."""
    recorded = [c.info.held_out_conversations for c in cartridges.values()]
    if not recorded:
        return None
    if any(ids is None for ids in recorded):
        logger.warning(
            "A cartridge does not record its held-out conversations (trained before they were "
            "recorded): fidelity is measured on conversations it may have trained on."
        )
        return None
    return sorted(set.intersection(*(set(ids) for ids in recorded)))


def held_out_conversations(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    ids: Sequence[str] | None,
    limit: int,
) -> list[HeldOutConversation]:
    """The first ``limit`` conversations among ``ids`` (``None``: all), with assistant positions.

    The assistant positions are where self-study recorded teacher targets: exactly the answer
    tokens, whatever the chat template looks like. Tables on disk are scanned for the wanted
    rows only, so memory holds the ``limit`` conversations, never the whole tables.
    """
    table = _first_conversations(conversations, ids, limit)
    wanted = set(table["conversation_id"])
    if isinstance(teacher_logprobs, ShardedTable):
        targets = teacher_logprobs.filter_rows(
            "conversation_id", sorted(wanted), ["conversation_id", "position"]
        )
    else:
        targets = teacher_logprobs[teacher_logprobs["conversation_id"].isin(wanted)]
    positions = {
        cid: sorted(set(group["position"].tolist()))
        for cid, group in targets.groupby("conversation_id", sort=False)
    }
    return [
        HeldOutConversation(
            str(row.conversation_id),
            json.loads(row.messages),
            [int(t) for t in row.token_ids],
            positions[row.conversation_id],
        )
        for row in table.itertuples(index=False)
        if positions.get(row.conversation_id)
    ]


def _first_conversations(
    conversations: pd.DataFrame | ShardedTable, ids: Sequence[str] | None, limit: int
) -> pd.DataFrame:
    """The first ``limit`` rows among ``ids`` (``None``: any), in table order."""
    if not isinstance(conversations, ShardedTable):
        if ids is not None:
            conversations = conversations[conversations["conversation_id"].isin(set(ids))]
        return conversations.head(limit)
    if ids is not None:
        return conversations.filter_rows("conversation_id", sorted(set(ids))).head(limit)
    batches, count = [], 0
    for batch in conversations.iter_batches(batch_size=max(limit, 1)):
        if count >= limit:
            break
        batches.append(batch.slice(0, limit - count))
        count += len(batches[-1])
    if not batches:
        return conversations.schema.empty_table().to_pandas()
    return pa.Table.from_batches(batches).to_pandas()
