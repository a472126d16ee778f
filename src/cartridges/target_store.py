"""Training examples read from the shard files a micro-batch at a time, never all at once.

A real run has 10^8-10^9 teacher target rows. :class:`LazyExamples` indexes them once (a
streaming scan of the ``conversation_id`` column: conversation -> global row range, which may
span shard files) and keeps only that index and the conversations' lengths in memory, so
batches are planned without reading a target. ``examples[i]`` or :meth:`LazyExamples.read`
reads a conversation's tokens and targets from the row groups that hold them and builds
exactly the tensors :func:`cartridges.targets.dense_examples` builds from DataFrames;
:func:`to_examples` takes either.
:func:`prefetch` reads the next steps' examples in a background thread (pyarrow releases the
GIL), so a training step does not wait on the disk.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cartridges.batching import Example
from cartridges.progress import progress_bar
from cartridges.tables import ShardedTable, shard_errors
from cartridges.targets import TargetsError, dense_examples, dense_targets

__all__ = ["LazyExamples", "example_lengths", "prefetch", "select"]

_SCAN_BATCH = 1 << 20  # rows per record batch when scanning a column


class LazyExamples(Sequence[Example]):
    """The conversations that have teacher targets, as examples read on access.

    Use :meth:`open` to build one from the ``conversations`` and ``teacher_logprobs`` tables.
    Holds per conversation only its rows in the two tables, its length and its id.
    """

    def __init__(
        self,
        conversations: ShardedTable,
        targets: ShardedTable,
        conversation_rows: np.ndarray,
        target_ranges: np.ndarray,
        lengths: np.ndarray,
        conversation_ids: Sequence[str],
        vocab_size: int,
        one_hot: bool = False,
    ) -> None:
        self._conversations = conversations
        self._targets = targets
        self._rows = conversation_rows  # [E] global row in the conversations table
        self._ranges = target_ranges  # [E, 2] global [start, stop) in the targets table
        self._lengths = lengths  # [E] int32
        self._ids = list(conversation_ids)
        self._vocab_size = vocab_size
        self._one_hot = one_hot

    @classmethod
    def open(
        cls, conversations: ShardedTable, targets: ShardedTable, vocab_size: int
    ) -> LazyExamples:
        """Index the tables, refusing ones that cannot be trained on (each error names a file).

        Reads the conversations' ids and lengths, the targets' ``conversation_id`` column (a
        stream) and the footers' token-id statistics; never the targets themselves.
        """
        if conversations.num_rows == 0:
            raise TargetsError("The conversations table is empty: run self_study first.")
        if targets.num_rows == 0:
            raise TargetsError(
                "The teacher_logprobs table is empty: no teacher target to train on."
            )
        _check_token_ids(targets, vocab_size)
        ids, lengths = _conversation_index(conversations)
        run_ids, starts, stops = _target_runs(targets)
        row_of = {cid: row for row, cid in enumerate(ids)}
        orphans = [cid for cid in run_ids if cid not in row_of]
        if orphans:
            raise TargetsError(
                f"teacher_logprobs ({targets!r}) refers to {len(orphans)} conversation(s) missing "
                f"from conversations ({conversations!r}) (e.g. {sorted(orphans)[:3]}): the two "
                "tables come from different runs."
            )
        rows = np.array(sorted(row_of[cid] for cid in run_ids), dtype=np.int64)
        run_of = {cid: i for i, cid in enumerate(run_ids)}
        order = np.array([run_of[ids[row]] for row in rows], dtype=np.int64)
        return cls(
            conversations,
            targets,
            rows,
            np.stack([starts[order], stops[order]], axis=1),
            lengths[rows],
            [ids[row] for row in rows],
            vocab_size,
        )

    # ------------------------------------------------------------------ views
    @property
    def lengths(self) -> np.ndarray:
        """``[E]`` tokens of each conversation (what batch planning needs; no data read)."""
        return self._lengths

    @property
    def conversation_ids(self) -> list[str]:
        return list(self._ids)

    def subset(self, indices: Sequence[int]) -> LazyExamples:
        """The examples at ``indices``, in that order, sharing the same files."""
        index = np.asarray(indices, dtype=np.int64)
        return LazyExamples(
            self._conversations,
            self._targets,
            self._rows[index],
            self._ranges[index],
            self._lengths[index],
            [self._ids[i] for i in index],
            self._vocab_size,
            self._one_hot,
        )

    def as_one_hot(self) -> LazyExamples:
        """The same positions with the actual next token as the only target (cross-entropy)."""
        view = self.subset(range(len(self)))
        view._one_hot = True
        return view

    def fingerprint(self) -> str:
        """Changes when the data changes, without reading the targets (see ``run_key``)."""
        digest = hashlib.sha256(b"one_hot" if self._one_hot else b"topk")
        digest.update(self._conversations.fingerprint().encode())
        digest.update(self._targets.fingerprint().encode())
        for cid in self._ids:
            digest.update(cid.encode() + b"\0")
        digest.update(self._lengths.astype(np.int64).tobytes())
        digest.update(self._ranges.tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> LazyExamples: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"Example {index} out of range for {len(self)} examples.")
        return self.read([index % len(self)])[0]

    def read(self, indices: Sequence[int]) -> list[Example]:
        """The examples at ``indices``, each shard row group read once for all of them."""
        if not len(indices):
            return []
        index = np.asarray(indices, dtype=np.int64)
        rows = self._rows[index]
        tokens = self._conversations.take_ranges(
            [(int(r), int(r) + 1) for r in rows], ["conversation_id", "token_ids"]
        )
        columns = ["position"] if self._one_hot else ["position", "token_id", "logprob"]
        ranges = [(int(a), int(b)) for a, b in self._ranges[index]]
        targets = self._targets.take_ranges(ranges, columns)
        return [
            self._example(int(i), conversation, target)
            for i, conversation, target in zip(index, tokens, targets, strict=True)
        ]

    def _example(self, i: int, conversation: pa.Table, target: pa.Table) -> Example:
        cid = self._ids[i]
        if conversation.column("conversation_id")[0].as_py() != cid:
            raise TargetsError(
                f"Conversation {cid} is no longer at row {self._rows[i]} of "
                f"{self._conversations!r}: the files changed since they were indexed."
            )
        token_ids = conversation.column("token_ids").combine_chunks().flatten()
        token_ids = token_ids.to_numpy(zero_copy_only=False).astype(np.int64)
        if len(token_ids) != self._lengths[i]:
            raise TargetsError(
                f"Conversation {cid} has {len(token_ids)} token ids but num_tokens says "
                f"{self._lengths[i]} in {self._conversations!r}."
            )
        position = _numpy(target, "position")
        if len(position) and (int(position.max()) >= len(token_ids) or int(position.min()) < 1):
            raise TargetsError(
                f"Conversation {cid} has targets at positions outside its {len(token_ids)} "
                f"tokens (in {self._file_of(i)})."
            )
        tokens = torch.from_numpy(token_ids)
        if self._one_hot:
            positions = torch.from_numpy(np.unique(position).astype(np.int64))
            return Example(
                tokens, positions, tokens[positions][:, None], torch.zeros((len(positions), 1))
            )
        token_id = _numpy(target, "token_id")
        if len(token_id) and (int(token_id.max()) >= self._vocab_size or int(token_id.min()) < 0):
            raise TargetsError(_vocabulary_message(self._file_of(i), token_id, self._vocab_size))
        positions, ids, logprobs = dense_targets(position, token_id, _numpy(target, "logprob"))
        return Example(tokens, positions, ids, logprobs)

    def _file_of(self, i: int) -> str:
        offsets = self._targets.file_offsets
        index = int(np.searchsorted(offsets, self._ranges[i, 0], side="right")) - 1
        return f"'{self._targets.url(index)}'"

    def __repr__(self) -> str:
        return f"LazyExamples({len(self)} conversations, targets in {self._targets!r})"


# --------------------------------------------------------------------------- helpers
def to_examples(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    vocab_size: int,
) -> list[Example] | LazyExamples:
    """Rebuild training examples, refusing tables that do not belong together.

    Two :class:`ShardedTable` handles give :class:`LazyExamples` (indexed now, read a
    micro-batch at a time); two DataFrames give dense examples at once.
    """
    if isinstance(conversations, ShardedTable) and isinstance(teacher_logprobs, ShardedTable):
        return LazyExamples.open(conversations, teacher_logprobs, vocab_size)
    if isinstance(conversations, ShardedTable) or isinstance(teacher_logprobs, ShardedTable):
        raise TypeError(
            "conversations and teacher_logprobs must both be ShardedTable handles or both be "
            f"DataFrames, got {type(conversations).__name__} and "
            f"{type(teacher_logprobs).__name__}."
        )
    return dense_examples(conversations, teacher_logprobs, vocab_size)


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Tokens of each example; read from the index for lazy examples (no data read)."""
    if isinstance(examples, LazyExamples):
        return examples.lengths.tolist()
    return [len(e.token_ids) for e in examples]


def select(examples: Sequence[Example], indices: Sequence[int]) -> Sequence[Example]:
    """The examples at ``indices``; lazy examples stay lazy."""
    if isinstance(examples, LazyExamples):
        return examples.subset(indices)
    return [examples[i] for i in indices]


def prefetch(
    examples: Sequence[Example], index_lists: Iterable[Sequence[int]], depth: int = 2
) -> Iterator[dict[int, Example]]:
    """``{index: example}`` for each list of indices, read ``depth`` lists ahead.

    Lazy examples are read in one background thread (pyarrow decodes without the GIL), so the
    disk works while the model computes; in-memory examples are handed out as they are.
    """
    if not isinstance(examples, LazyExamples):
        for indices in index_lists:
            yield {i: examples[i] for i in indices}
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    pending: deque[tuple[Sequence[int], Future]] = deque()
    remaining = iter(index_lists)
    try:
        for indices in remaining:
            pending.append((indices, pool.submit(examples.read, list(indices))))
            if len(pending) >= depth:
                break
        while pending:
            indices, future = pending.popleft()
            following = next(remaining, None)
            if following is not None:
                pending.append((following, pool.submit(examples.read, list(following))))
            yield dict(zip(indices, future.result(), strict=True))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _numpy(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def _vocabulary_message(where: str, token_id: np.ndarray, vocab_size: int) -> str:
    bad = int(token_id.max()) if int(token_id.max()) >= vocab_size else int(token_id.min())
    return (
        f"Teacher token id {bad} in {where} is outside the student's vocabulary of {vocab_size}: "
        "the conversations were synthesised with a different tokenizer than the student model's."
    )


def _conversation_index(conversations: ShardedTable) -> tuple[list[str], np.ndarray]:
    """Every conversation's id and length, in table order (two small columns)."""
    missing = {"conversation_id", "token_ids"} - set(conversations.column_names)
    if missing:
        raise TargetsError(f"{conversations!r} has no column(s) {sorted(missing)}.")
    has_count = "num_tokens" in conversations.column_names
    ids: list[str] = []
    lengths: list[np.ndarray] = []
    columns = ["conversation_id", "num_tokens" if has_count else "token_ids"]
    for batch in conversations.iter_batches(columns, batch_size=_SCAN_BATCH):
        ids += batch.column(0).to_pylist()
        counts = batch.column(1) if has_count else pc.list_value_length(batch.column(1))
        lengths.append(counts.to_numpy(zero_copy_only=False).astype(np.int32))
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(cid for cid in ids if cid in seen or seen.add(cid))
        raise TargetsError(f"Conversation id {twice!r} appears twice in {conversations!r}.")
    return ids, np.concatenate(lengths)


def _target_runs(targets: ShardedTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each conversation's global row range in the targets, refusing ungrouped targets."""
    if "conversation_id" not in targets.column_names:
        raise TargetsError(f"{targets!r} has no column 'conversation_id'.")
    ids: list[str] = []
    starts: list[int] = []
    stops: list[int] = []
    file_of: dict[str, int] = {}
    offset = 0
    files = [targets.url(index) for index in range(len(targets.files))]
    bar = progress_bar(
        total=targets.num_rows,
        desc="index targets",
        unit="row",
        unit_scale=True,
        disable=targets.num_rows < _SCAN_BATCH * 8,  # a bar only where the scan takes a while
    )
    with bar:
        for index, path in enumerate(files):
            targets.metadata(index)  # a clear error for a missing or truncated shard
            parquet = targets.open(index, read_dictionary=["conversation_id"])
            batches = parquet.iter_batches(batch_size=_SCAN_BATCH, columns=["conversation_id"])
            for batch in _named(path, batches):
                column = batch.column(0)
                if not isinstance(column, pa.DictionaryArray):
                    column = pc.dictionary_encode(column)
                codes = column.indices.to_numpy(zero_copy_only=False)
                if len(codes) == 0:
                    continue
                begins = np.flatnonzero(np.diff(codes)) + 1
                begins = np.concatenate([[0], begins])
                names = column.dictionary.take(pa.array(codes[begins])).to_pylist()
                ends = np.concatenate([begins[1:], [len(codes)]])
                for name, begin, end in zip(names, begins, ends, strict=True):
                    if ids and ids[-1] == name and stops[-1] == offset + begin:
                        stops[-1] = offset + int(end)  # the run goes on across a batch or file
                        continue
                    if name in file_of:
                        raise TargetsError(
                            f"Teacher targets are not grouped by conversation: {name!r} appears "
                            f"in '{files[file_of[name]]}' and again in '{path}' after other "
                            "conversations. Write each conversation's targets contiguously."
                        )
                    file_of[name] = index
                    ids.append(name)
                    starts.append(offset + int(begin))
                    stops.append(offset + int(end))
                offset += len(codes)
                bar.update(len(codes))
    return ids, np.array(starts, dtype=np.int64), np.array(stops, dtype=np.int64)


def _check_token_ids(targets: ShardedTable, vocab_size: int) -> None:
    """Token ids within the vocabulary, from footer statistics (a column scan where absent)."""
    if "token_id" not in targets.column_names:
        raise TargetsError(f"{targets!r} has no column 'token_id'.")
    column = targets.column_names.index("token_id")
    for index in range(len(targets.files)):
        footer, path = targets.metadata(index), targets.url(index)
        stats = [
            footer.row_group(g).column(column).statistics for g in range(footer.num_row_groups)
        ]
        if all(s is not None and s.has_min_max for s in stats):
            if not stats:
                continue
            low, high = min(s.min for s in stats), max(s.max for s in stats)
        else:
            low, high = _scan_min_max(targets, index)
        if low < 0 or high >= vocab_size:
            raise TargetsError(_vocabulary_message(f"'{path}'", np.array([low, high]), vocab_size))


def _named(path, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches`` of the file at ``path``; a read error (a failed checksum) names the file."""
    with shard_errors(path):
        yield from batches


def _scan_min_max(targets: ShardedTable, index: int) -> tuple[int, int]:
    low, high = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    batches = targets.open(index).iter_batches(batch_size=_SCAN_BATCH, columns=["token_id"])
    for batch in _named(targets.url(index), batches):
        if len(batch):
            bounds = pc.min_max(batch.column(0))
            low, high = min(low, bounds["min"].as_py()), max(high, bounds["max"].as_py())
    return low, high
