"""A ragged KV cache of rows' own tokens, next to one stored copy of each prefix they attend to.

Rows (requests being decoded) have different lengths and join and leave between steps. Their
own tokens' keys and values live in a pool of fixed-size blocks (all layers, keys and values, in
one tensor), as in paged attention: a row holds a list of blocks, a step writes into its last
block or takes a free one, and a row that leaves returns its blocks at once. Nothing is re-padded
or moved when rows join or leave; the pool doubles when it runs out (amortised growth) and keeps
its size. Each distinct prefix (a cartridge) is stored once, as a
:class:`~cartridges.decoding.shared_prefix.PrefixKV`, however many rows use it, and dropped with
its last row.

A forward over some rows goes through a :class:`StepCache` (:meth:`RaggedCache.step_cache`): a
transformers ``Cache`` whose ``update`` writes the new tokens into the rows' blocks and hands
attention each row's own tokens (gathered, right-padded to the longest row), with the
:class:`~cartridges.decoding.shared_prefix.SharedPrefixBatch` that says where they sit. Some models
keep per-row state on the cache object (the toy-world model's ``_toy_prev_ids``): tensor attributes
whose first dimension is the batch are set from the rows before the forward and handed back to
them after it (:meth:`StepCache.keep_row_state`), so that the state follows its rows. Other
attributes a model sets are not kept.

This module runs no model; :mod:`cartridges.decoding.continuous` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Cache

from cartridges.cartridge import Cartridge
from cartridges.decoding.shared_prefix import INVALID_POSITION, PrefixKV, SharedPrefixBatch
from cartridges.modeling import KVLayout


@dataclass(eq=False)
class Row:
    """One row's share of the cache: its prefix, its blocks and the state a model keeps on it.

    Attributes:
        prefix: the stored prefix it attends to (``None``: none).
        blocks: pool blocks holding its own tokens, in order.
        length: own tokens stored (prompt and generated tokens fed so far).
        state: per-row tensors a model keeps on the cache object, ``[1, ...]`` each.
    """

    prefix: PrefixKV | None
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prefix_len(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0


@dataclass(frozen=True)
class KVMemory:
    """What the cache holds, counted from its tensors.

    Attributes:
        prefix_bytes: every distinct stored prefix, once.
        own_tokens: the rows' own tokens.
        own_bytes: those tokens' keys and values.
        block_bytes: the blocks the rows hold (their own tokens, the last block partly filled).
        pool_bytes: the whole pool, free blocks included.
    """

    prefix_bytes: int
    own_tokens: int
    own_bytes: int
    block_bytes: int
    pool_bytes: int


@dataclass(eq=False)
class _Stored:
    """A stored prefix, the cartridge it was made from (kept alive: its id is the key), its rows."""

    cartridge: Cartridge
    kv: PrefixKV
    rows: int = 0


class RaggedCache:
    """Rows' own tokens in a block pool, and each distinct prefix once.

    Args:
        layout: the model's KV layout (:func:`cartridges.modeling.kv_layout`).
        dtype: the model's dtype; prefixes are converted to it when stored.
        device: where the pool and the prefixes live.
        block_size: own tokens per block.
        num_blocks: blocks allocated up front (the pool doubles when they run out).
    """

    def __init__(
        self,
        layout: KVLayout,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = 16,
        num_blocks: int = 16,
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError(
                f"block_size and num_blocks must be >= 1, got {block_size}, {num_blocks}"
            )
        self.layout, self.dtype, self.device = layout, dtype, torch.device(device)
        self.block_size = block_size
        shape = (
            layout.num_layers,
            2,
            num_blocks * block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        self.pool = torch.zeros(shape, dtype=dtype, device=self.device)  # [L, 2, S, Hkv, D]
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: low blocks first
        self._prefixes: dict[int, _Stored] = {}
        self.rows: list[Row] = []

    # ------------------------------------------------------------------ rows and prefixes
    def add_row(self, prefix: Cartridge | None) -> Row:
        """A new empty row after ``prefix``, stored (as it is now) unless a row already holds it."""
        stored = None
        if prefix is not None:
            stored = self._prefixes.get(id(prefix))
            if stored is None:
                kv = PrefixKV.from_cartridge(prefix, self.dtype, self.device)
                stored = self._prefixes[id(prefix)] = _Stored(prefix, kv)
            stored.rows += 1
        row = Row(stored.kv if stored is not None else None)
        self.rows.append(row)
        return row

    def remove_row(self, row: Row) -> None:
        """Free the row's blocks now, and its prefix when no other row attends to it."""
        self.rows.remove(row)
        self._free.extend(reversed(row.blocks))
        row.blocks, row.length = [], 0
        for key, stored in list(self._prefixes.items()):
            if stored.kv is row.prefix:
                stored.rows -= 1
                if stored.rows == 0:
                    del self._prefixes[key]

    def holds(self, prefix: Cartridge | None) -> bool:
        """Whether ``prefix`` is stored already (``None``, no prefix, always is)."""
        return prefix is None or id(prefix) in self._prefixes

    @property
    def prefix_tokens(self) -> int:
        """Tokens of all stored prefixes, each counted once."""
        return sum(stored.kv.num_tokens for stored in self._prefixes.values())

    def memory(self) -> KVMemory:
        slot_bytes = self.pool[:, :, :1].nbytes  # one token, all layers, keys and values
        own_tokens = sum(row.length for row in self.rows)
        blocks = sum(len(row.blocks) for row in self.rows)
        return KVMemory(
            prefix_bytes=sum(stored.kv.nbytes for stored in self._prefixes.values()),
            own_tokens=own_tokens,
            own_bytes=own_tokens * slot_bytes,
            block_bytes=blocks * self.block_size * slot_bytes,
            pool_bytes=self.pool.nbytes,
        )

    # ------------------------------------------------------------------ blocks
    def _extend(self, row: Row, count: int) -> None:
        """Give ``row`` room for ``count`` more tokens (taking blocks, growing the pool)."""
        needed = -(-(row.length + count) // self.block_size) - len(row.blocks)
        if needed > len(self._free):
            self._grow(needed - len(self._free))
        row.blocks.extend(self._free.pop() for _ in range(needed))

    def _grow(self, at_least: int) -> None:
        """Double the pool (or more, to add ``at_least`` blocks); slots keep their indices."""
        blocks = self.pool.shape[2] // self.block_size
        added = max(blocks, at_least)
        extra = torch.zeros_like(self.pool[:, :, : added * self.block_size])
        self.pool = torch.cat([self.pool, extra], dim=2)
        self._free = list(range(blocks + added - 1, blocks - 1, -1)) + self._free

    # ------------------------------------------------------------------ one forward
    def step_cache(self, rows: list[Row], counts: list[int], width: int) -> StepCache:
        """The cache for one forward of ``rows``, whose inputs are ``[B, width]``, left-padded.

        Row ``b`` feeds ``counts[b]`` new tokens (the last ones of its input), which take its
        next own positions. Their blocks are taken now.
        """
        device, size = self.device, self.block_size
        starts = torch.tensor([row.length for row in rows], device=device)  # [B]
        for row, count in zip(rows, counts, strict=True):
            self._extend(row, count)
            row.length += count
        lengths = [row.length for row in rows]
        widest = max(len(row.blocks) for row in rows)
        table = torch.tensor([row.blocks + [0] * (widest - len(row.blocks)) for row in rows])
        prefix_lens = torch.tensor([row.prefix_len for row in rows], device=device)[:, None]
        own = torch.arange(max(lengths), device=device)  # [L]
        slots = table.to(device)[:, own // size] * size + own % size  # [B, L]
        valid = own < torch.tensor(lengths, device=device)[:, None]  # [B, L]
        column = torch.arange(width, device=device)
        pads = torch.tensor([width - count for count in counts], device=device)[:, None]
        index = starts[:, None] + column - pads  # [B, T]: own index of each input
        is_new = index >= starts[:, None]
        batch = SharedPrefixBatch(
            query_positions=prefix_lens + torch.maximum(index, starts[:, None]),
            key_positions=torch.where(valid, prefix_lens + own, INVALID_POSITION),
            groups=self._groups(rows),
        )
        return StepCache(
            self.pool,
            batch,
            rows,
            write_slots=slots.gather(1, index.clamp(min=0))[is_new],
            write_index=is_new.flatten().nonzero().squeeze(1),
            read_slots=torch.where(valid, slots, 0),
            seen=max(r.prefix_len + r.length - n for r, n in zip(rows, counts, strict=True)),
        )

    def _groups(self, rows: list[Row]) -> list[tuple[PrefixKV, torch.Tensor | None]]:
        """Each distinct prefix among ``rows`` with their indices (``None`` when all of them)."""
        members: dict[int, tuple[PrefixKV, list[int]]] = {}
        for index, row in enumerate(rows):
            if row.prefix is not None:
                members.setdefault(id(row.prefix), (row.prefix, []))[1].append(index)
        if len(members) == 1:
            ((prefix, indices),) = members.values()
            if len(indices) == len(rows):
                return [(prefix, None)]
        return [
            (prefix, torch.tensor(indices, device=self.device))
            for prefix, indices in members.values()
        ]


class StepCache(Cache):
    """One forward's cache: writes the new tokens into the pool and hands back the rows' own KV.

    Also carries the rows' model state as attributes (see the module docstring).
    """

    def __init__(
        self,
        pool: torch.Tensor,
        batch: SharedPrefixBatch,
        rows: list[Row],
        write_slots: torch.Tensor,
        write_index: torch.Tensor,
        read_slots: torch.Tensor,
        seen: int,
    ) -> None:
        super().__init__(layers=[])
        self.pool, self.batch, self.rows = pool, batch, rows
        self.write_slots, self.write_index, self.read_slots = write_slots, write_index, read_slots
        self.seen = seen
        self._own_attributes = frozenset(vars(self)) | {"_own_attributes"}
        names = set.intersection(*(set(row.state) for row in rows))
        for name in names:
            setattr(self, name, torch.cat([row.state[name] for row in rows]))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the valid new tokens; return every row's own keys and values ``[B, Hkv, L, D]``."""
        batch_size, kv_heads, width, dim = key_states.shape
        keys, values = self.pool[layer_idx, 0], self.pool[layer_idx, 1]  # [S, Hkv, D]
        new_keys = key_states.transpose(1, 2).reshape(batch_size * width, kv_heads, dim)
        new_values = value_states.transpose(1, 2).reshape(batch_size * width, kv_heads, -1)
        keys[self.write_slots] = new_keys[self.write_index].to(keys.dtype)
        values[self.write_slots] = new_values[self.write_index].to(values.dtype)
        return keys[self.read_slots].transpose(1, 2), values[self.read_slots].transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached before this forward in the longest row (its prefix included)."""
        return self.seen

    def keep_row_state(self) -> None:
        """Hand the per-row tensors the model left on this cache back to their rows."""
        batch_size = len(self.rows)
        names = [
            name
            for name, value in vars(self).items()
            if name not in self._own_attributes
            and isinstance(value, torch.Tensor)
            and value.ndim > 0
            and value.shape[0] == batch_size
        ]
        for index, row in enumerate(self.rows):
            row.state = {name: getattr(self, name)[index : index + 1] for name in names}
