"""A lazy, read-only handle on a table stored as an ordered list of parquet files.

Teacher targets of a real run are 10^8-10^9 rows: they must never be one DataFrame. A
:class:`ShardedTable` only knows its files; row counts and the schema come from parquet
footers, and rows are read on demand (whole, as record batches, or one row range of one file).
Nothing here caches data, so a handle costs the same memory for a thousand rows or a billion.

Every parquet file the project writes carries a CRC32 checksum per page
(:func:`write_parquet`, :func:`parquet_writer`) and every read verifies them
(:func:`parquet_file`, :data:`PARQUET_FORMAT`): a byte changed after the write, even one that
keeps the file's size and decodes to a plausible value, is refused when its page is read, naming
the file. The check rides on the read itself (the pages are in memory anyway), so lazy reads of
a billion-row table stay lazy. A handle verifies each page the first time it reads it, and again
once the file's identity (inode, size, modification or status-change time; an object's size
and ETag) changes: training, which decodes a row group once per micro-batch that touches it,
pays for each checksum once rather than on every re-read.

The files may be on an object store (:class:`~cartridges.storage.Store`): reads stay lazy, a
row group is fetched by its byte range, and each file's footer is fetched once per handle (and
again only if the file's identity changes).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cartridges.storage import Store, local_store

__all__ = [
    "PARQUET_FORMAT",
    "ShardError",
    "ShardedTable",
    "parquet_file",
    "parquet_writer",
    "shard_errors",
    "write_parquet",
]

_SAMPLE = 1 << 20  # bytes at each end of a file that its fingerprint hashes
_READ_TRIES = 3  # reads of a file that changes while it is read, before giving up
_CHECKSUM_FAILED = "CRC checksum verification failed"

PARQUET_FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
)
"""Dataset scans that verify every page's checksum."""


def write_parquet(table: pa.Table, path: str | os.PathLike, **options: Any) -> None:
    """``pq.write_table`` with a checksum in every page."""
    pq.write_table(table, path, write_page_checksum=True, **options)


def parquet_writer(path: str | os.PathLike, schema: pa.Schema, **options: Any) -> pq.ParquetWriter:
    """``pq.ParquetWriter`` with a checksum in every page."""
    return pq.ParquetWriter(path, schema, write_page_checksum=True, **options)


def parquet_file(
    source: str | os.PathLike | pa.NativeFile,
    store: Store | None = None,
    verify: bool = True,
    **options: Any,
) -> pq.ParquetFile:
    """``pq.ParquetFile`` of a path in ``store`` (or of an open file) that verifies each page's
    checksum as it is read (unless ``verify`` is false: pages verified before)."""
    if isinstance(source, pa.NativeFile):
        return pq.ParquetFile(source, page_checksum_verification=verify, **options)
    if store is not None and not store.is_local:
        options["filesystem"] = store.arrow()
    return pq.ParquetFile(str(source), page_checksum_verification=verify, **options)


_FOOTERS_KEPT = 1024


class _Footers:
    """The footers of a table's files on an object store, the ``capacity`` most recently used
    (with the identity each was read at): the footer of a 16 MB targets shard takes ~115 KB in
    memory, so keeping all of 10^4 shards' would take a gigabyte. An evicted one is fetched
    again (one small ranged GET)."""

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = capacity or _FOOTERS_KEPT
        self._entries: OrderedDict[int, tuple[tuple[Any, ...], pq.FileMetaData]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> tuple[tuple[Any, ...], pq.FileMetaData] | None:
        with self._lock:
            entry = self._entries.get(index)
            if entry is not None:
                self._entries.move_to_end(index)
            return entry

    def put(self, index: int, entry: tuple[tuple[Any, ...], pq.FileMetaData]) -> None:
        with self._lock:
            self._entries[index] = entry
            self._entries.move_to_end(index)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def pop(self, index: int) -> None:
        with self._lock:
            self._entries.pop(index, None)

    def __len__(self) -> int:
        return len(self._entries)


_REMOTE_READS: list[ThreadPoolExecutor] = []
_REMOTE_READERS = 16  # files of one micro-batch fetched at once from an object store


def _remote_reads() -> ThreadPoolExecutor:
    """Threads that wait on an object store's round trips (shared by every table)."""
    if not _REMOTE_READS:
        _REMOTE_READS.append(
            ThreadPoolExecutor(max_workers=_REMOTE_READERS, thread_name_prefix="shard-read")
        )
    return _REMOTE_READS[0]


def _changed_while_read(error: BaseException) -> bool:
    """A read refused because the object's ETag is no longer the one it was opened with (the
    S3 client's ``FileExpired``, however pyarrow passed it on)."""
    while error is not None:
        if type(error).__name__ == "FileExpired" or "pre-condition" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def corrupted(path: str | os.PathLike, error: Exception) -> ShardError | None:
    """The error to raise for a page whose checksum failed, or ``None`` for other errors."""
    if _CHECKSUM_FAILED not in str(error):
        return None
    return ShardError(
        f"Shard '{path}' failed its page checksum ({error}): its bytes changed after it was "
        "written (disk or copy corruption, or an edit). Re-run the stage that writes it."
    )


class ShardError(ValueError):
    """A shard file is missing, unreadable or does not match the table it belongs to."""


def _missing(store: Store, files: Sequence[Path | PurePosixPath]) -> list[Path | PurePosixPath]:
    """The files that are not there: a stat each on a disk, one listing per folder on an object
    store (10^5 shards are 100 listings, not 10^5 requests)."""
    if store.is_local:
        return [f for f in files if not store.is_file(f)]
    listed: dict[PurePosixPath, set[str]] = {}
    for file in files:
        if file.parent not in listed:
            listed[file.parent] = set(store.file_sizes(file.parent))
    return [f for f in files if f.name not in listed[f.parent]]


class ShardedTable:
    """An ordered list of parquet files read as one table, lazily.

    Args:
        files: the shard files, in table order. They must exist and share one schema.
        attrs: small JSON-able metadata that travels with the table (like ``DataFrame.attrs``):
            the self-study run id, the lineage record. ``ParquetShardsDataset`` persists it.
        store: where the files are (``None``: local paths); on an object store the paths are
            without their protocol (``bucket/key``).
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        attrs: dict[str, Any] | None = None,
        store: Store | None = None,
    ) -> None:
        if isinstance(files, (str, Path)):
            raise TypeError("ShardedTable takes a sequence of files, not a single path.")
        self.attrs: dict[str, Any] = dict(attrs or {})
        self._store = store if store is not None else local_store()
        self._files = [Path(f) if self._store.is_local else PurePosixPath(str(f)) for f in files]
        self._fingerprint: str | None = None
        # file index -> (its identity when verified, per column the row groups verified: one
        # byte per row group, so 10^11 rows in 64k-row groups cost megabytes, not a set of pairs)
        self._verified: dict[int, tuple[tuple[int, ...], dict[str, np.ndarray]]] = {}
        self._verified_lock = threading.Lock()
        self._footers = _Footers()
        missing = [self._store.url(f) for f in _missing(self._store, self._files)]
        if missing:
            raise ShardError(f"Shard file(s) not found: {missing[:3]}.")

    def __getstate__(self) -> dict[str, Any]:
        """A copy (or a pickle sent to another process) verifies afresh what it reads."""
        state = self.__dict__.copy()
        del state["_verified"], state["_verified_lock"], state["_footers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._verified, self._verified_lock, self._footers = {}, threading.Lock(), _Footers()

    @classmethod
    def from_dataframe(cls, data: pd.DataFrame, path: str | Path) -> ShardedTable:
        """Write ``data`` as one parquet file at ``path`` (small tables and tests)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(pa.Table.from_pandas(data, preserve_index=False), path)
        return cls([path], attrs=data.attrs)

    # ------------------------------------------------------------------ metadata only
    @property
    def files(self) -> list[Path]:
        """The shard files, in table order (paths in :attr:`store`)."""
        return list(self._files)

    @property
    def store(self) -> Store:
        """Where the files are."""
        return self._store

    @cached_property
    def file_num_rows(self) -> list[int]:
        """Rows of each file, from the parquet footers (no data read)."""
        return [self.metadata(i).num_rows for i in range(len(self._files))]

    @property
    def num_rows(self) -> int:
        """Rows of the whole table, from the parquet footers (no data read)."""
        return sum(self.file_num_rows)

    def __len__(self) -> int:
        return self.num_rows

    @cached_property
    def schema(self) -> pa.Schema:
        """The arrow schema shared by every shard; a mismatch names the offending file."""
        if not self._files:
            raise ShardError("A ShardedTable with no file has no schema.")
        first = self._schema_of(0)
        for index in range(1, len(self._files)):
            other = self._schema_of(index)
            if not other.remove_metadata().equals(first.remove_metadata()):
                raise ShardError(
                    f"Shard '{self._files[index]}' has schema {other.remove_metadata()} which "
                    f"differs from '{self._files[0]}': {first.remove_metadata()}."
                )
        return first

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def _schema_of(self, index: int) -> pa.Schema:
        return self.metadata(index).schema.to_arrow_schema()

    def open(self, index: int, **options: Any) -> pq.ParquetFile:
        """File ``index`` as a ``ParquetFile`` verifying its page checksums (from its store)."""
        footer = None if self._store.is_local else self.metadata(index)
        return parquet_file(self._files[index], self._store, metadata=footer, **options)

    def url(self, index: int) -> str:
        """Where file ``index`` is, as a user writes it (a path, or a URL on a store)."""
        return self._store.url(self._files[index])

    def metadata(self, index: int) -> pq.FileMetaData:
        """The parquet footer of file ``index``; a missing or truncated file names itself."""
        path = self._files[index]
        with shard_errors(self._store.url(path)):
            if self._store.is_local:
                return pq.read_metadata(path)
            return self._footer(index, self._store.identity(path))

    def _footer(self, index: int, identity: tuple[Any, ...], handle=None) -> pq.FileMetaData:
        """The footer of a file on a store as it is now (``identity``), fetched once per change
        (through ``handle`` if the file is open already)."""
        known = self._footers.get(index)
        if known is None or known[0] != identity:
            opened = (
                nullcontext(handle) if handle is not None else self._store.open(self._files[index])
            )
            with opened as source:
                known = (identity, pq.read_metadata(source))
            self._footers.put(index, known)
        return known[1]

    def fingerprint(self) -> str:
        """A digest that changes when any shard's content does, reading no more than 2 MiB each.

        Footers (row counts, per-column sizes and statistics), file sizes and the first and last
        MiB of every file: a changed shard virtually always differs in one of them, and the
        rows of a billion-row table are never read. Computed once per handle: lineage records,
        MLflow inputs and the training resume key all ask for it.
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for index, path in enumerate(self._files):
            footer = self.metadata(index)
            size = self._store.size(path)
            digest.update(str(size).encode())
            with self._store.open(path) as handle:
                digest.update(handle.read(_SAMPLE))
                handle.seek(max(size - _SAMPLE, 0))
                digest.update(handle.read(_SAMPLE))
            digest.update(str(footer.num_rows).encode())
            digest.update(footer.schema.to_arrow_schema().remove_metadata().to_string().encode())
            for group in range(footer.num_row_groups):
                row_group = footer.row_group(group)
                digest.update(str(row_group.num_rows).encode())
                for column in range(row_group.num_columns):
                    chunk = row_group.column(column)
                    stats = chunk.statistics
                    digest.update(
                        repr(
                            (
                                chunk.total_compressed_size,
                                chunk.total_uncompressed_size,
                                stats.min if stats is not None and stats.has_min_max else None,
                                stats.max if stats is not None and stats.has_min_max else None,
                            )
                        ).encode()
                    )
        return digest.hexdigest()

    # ------------------------------------------------------------------ reading rows
    def to_pandas(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table as one DataFrame: only for tables known to be small."""
        if not self._files:
            return pd.DataFrame(columns=list(columns or []))
        try:
            table = self._dataset().to_table(columns=list(columns) if columns is not None else None)
        except (FileNotFoundError, pa.ArrowInvalid, OSError) as error:
            if corrupted(self._describe(), error) is not None:
                self.verify()  # names the file
            raise ShardError(f"Cannot read table of {self._describe()}: {error}") from error
        return table.to_pandas()

    def iter_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_size`` rows, file after file, in table order."""
        for index, path in enumerate(self._files):
            meta = self.metadata(index)  # a clear error for a missing or truncated file
            try:
                parquet = parquet_file(path, self._store, metadata=meta)
                yield from parquet.iter_batches(
                    batch_size=batch_size, columns=list(columns) if columns is not None else None
                )
            except (FileNotFoundError, pa.ArrowInvalid, OSError) as error:
                url = self._store.url(path)
                raise corrupted(url, error) or ShardError(
                    f"Cannot read shard '{url}': {error}"
                ) from error

    def verify(self, batch_size: int = 65_536) -> None:
        """Read every page of every file, checking its checksum (a full read: for resumes and
        audits, not on the training path, whose reads verify the pages they touch first).

        Raises:
            ShardError: naming the first file with a page that fails.
        """
        for _ in self.iter_batches(batch_size=batch_size):
            pass

    @cached_property
    def file_offsets(self) -> np.ndarray:
        """``[files + 1]`` first global row of each file, then the total row count."""
        return np.concatenate([[0], np.cumsum(self.file_num_rows, dtype=np.int64)])

    def read_rows(
        self, index: int, start: int, stop: int, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Rows ``[start, stop)`` of file ``index``, reading only the row groups they span."""
        return self._read_file_ranges(index, [(start, stop)], columns)[0]

    def take_ranges(
        self, ranges: Sequence[tuple[int, int]], columns: Sequence[str] | None = None
    ) -> list[pa.Table]:
        """The rows of each global ``[start, stop)`` range, in the order asked.

        A range may span files. Each file is opened once and each row group decoded once, however
        many ranges fall in it, so reading a micro-batch costs the row groups it touches.
        """
        offsets = self.file_offsets
        pieces: dict[int, list[tuple[int, int, int]]] = {}  # file -> (range, start, stop)
        for which, (start, stop) in enumerate(ranges):
            if not 0 <= start <= stop <= offsets[-1]:
                raise ShardError(
                    f"Rows [{start}, {stop}) are outside the {offsets[-1]} rows of "
                    f"{self._describe()}."
                )
            if start == stop:
                continue
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
            for index in range(first, last + 1):
                lo, hi = max(start, offsets[index]), min(stop, offsets[index + 1])
                if hi > lo:
                    pieces.setdefault(index, []).append(
                        (which, int(lo - offsets[index]), int(hi - offsets[index]))
                    )
        parts: list[list[pa.Table]] = [[] for _ in ranges]
        files = sorted(pieces.items())

        def read(item: tuple[int, list[tuple[int, int, int]]]) -> list[pa.Table]:
            index, wanted = item
            return self._read_file_ranges(index, [(lo, hi) for _, lo, hi in wanted], columns)

        # On an object store each file costs round trips: read the files at once, not in turn.
        if self._store.is_local or len(files) == 1:
            read_files = map(read, files)
        else:
            read_files = _remote_reads().map(read, files)
        for (_, wanted), tables in zip(files, read_files, strict=True):
            for (which, _, _), table in zip(wanted, tables, strict=True):
                parts[which].append(table)
        return [
            pa.concat_tables(p) if len(p) > 1 else p[0] if p else self._empty(columns)
            for p in parts
        ]

    def filter_rows(
        self, column: str, values: Sequence, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The rows whose ``column`` is among ``values``; a streaming scan holds only matches."""
        wanted = pa.array(list(values), self.schema.field(column).type)
        try:
            table = self._dataset().to_table(
                columns=list(columns) if columns is not None else None,
                filter=pc.field(column).isin(wanted),
            )
        except (FileNotFoundError, pa.ArrowInvalid, OSError) as error:
            if corrupted(self._describe(), error) is not None:
                self.verify()  # names the file
            raise ShardError(f"Cannot read {self._describe()}: {error}") from error
        return table.to_pandas()

    def _dataset(self) -> ds.Dataset:
        return ds.dataset(
            [str(f) for f in self._files],
            format=PARQUET_FORMAT,
            schema=self.schema,
            filesystem=self._store.arrow(),
        )

    def _empty(self, columns: Sequence[str] | None) -> pa.Table:
        table = self.schema.empty_table()
        return table.select(list(columns)) if columns is not None else table

    def _read_file_ranges(
        self, index: int, ranges: Sequence[tuple[int, int]], columns: Sequence[str] | None
    ) -> list[pa.Table]:
        url = self._store.url(self._files[index])
        for _ in range(_READ_TRIES):
            with shard_errors(url):
                read = self._read_groups(index, ranges, columns)
            if read is not None:
                table, groups, sizes, starts = read
                break
        else:
            raise ShardError(f"Shard '{url}' changed each time it was read: it is being written.")
        # Row ``r`` of the file is row ``r - starts[g] + read_start[g]`` of what was read.
        read_start = dict(zip(groups, np.cumsum([0] + [sizes[g] for g in groups]), strict=False))
        out = []
        for lo, hi in ranges:
            if hi <= lo or table is None:
                out.append(self._empty(columns))
                continue
            g = int(np.searchsorted(starts, lo, side="right")) - 1
            out.append(table.slice(int(lo - starts[g] + read_start[g]), hi - lo))
        return out

    def _read_groups(
        self, index: int, ranges: Sequence[tuple[int, int]], columns: Sequence[str] | None
    ) -> tuple[pa.Table | None, list[int], list[int], np.ndarray] | None:
        """The row groups of file ``index`` that ``ranges`` span, read whole (their pages'
        checksums verified once per handle); ``None`` if the file changed while it was read."""
        path, url = self._files[index], self._store.url(self._files[index])
        try:
            with self._opened(index) as (open_parquet, identity, pinned):
                parquet = open_parquet(verify=True)
                meta = parquet.metadata
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
                bad = [(lo, hi) for lo, hi in ranges if not 0 <= lo <= hi <= meta.num_rows]
                if bad:
                    raise ShardError(
                        f"Rows {bad[0]} are outside shard '{url}' of {meta.num_rows} rows: the "
                        "file changed since it was indexed."
                    )
                groups = sorted(
                    {
                        g
                        for lo, hi in ranges
                        if hi > lo
                        for g in range(
                            int(np.searchsorted(starts, lo, side="right")) - 1,
                            int(np.searchsorted(starts, hi - 1, side="right")),
                        )
                    }
                )
                cols = list(columns) if columns is not None else None
                names = cols if cols is not None else parquet.schema_arrow.names
                fresh, known = self._split_verified(index, identity, groups, names, len(sizes))
                table = parquet.read_row_groups(fresh, columns=cols) if fresh else None
                if known:
                    plain = open_parquet(verify=False, metadata=meta)
                    plain = plain.read_row_groups(known, columns=cols)
                    table = _in_group_order(fresh, table, known, plain, sizes)
        except OSError as error:  # the footer or a row group, on a store that pins reads
            if self._store.pins_reads and _changed_while_read(error):
                self._footers.pop(index)  # the next try asks the store afresh
                return None
            raise
        if not pinned and self._store.identity(path) != identity:  # changed while read
            return None
        self._mark_verified(index, identity, fresh, names)
        return table, groups, sizes, starts

    @contextmanager
    def _opened(self, index: int) -> Iterator[tuple[Callable[..., pq.ParquetFile], tuple, bool]]:
        """File ``index`` ready to read: a maker of ``ParquetFile`` views of it (``verify``: its
        page checksums), its identity, and whether every read is pinned to that identity.

        On S3 one request (a HEAD) gives the identity, and every ranged GET then carries the
        ETag (``If-Match``), so a file replaced mid-read is refused by the server rather than
        read as a mix of two versions. Elsewhere the identity is taken before the reads and
        compared after them.
        """
        path = self._files[index]
        if not self._store.pins_reads:
            identity = self._store.identity(path)  # before opening: a replacement shows
            footer = None if self._store.is_local else self._footer(index, identity)
            yield (
                lambda verify, metadata=footer: parquet_file(
                    path, self._store, verify=verify, metadata=metadata
                ),
                identity,
                False,
            )
            return
        known = self._footers.get(index)
        if known is not None:  # no request: a GET that finds another ETag fails, read again
            handle = self._store.open_pinned(path, known[0])
        else:
            handle = self._store.open(path)  # one HEAD: its size and ETag
        with handle:
            identity = self._store.identity_of(handle)
            footer = self._footer(index, identity, handle)
            source = pa.PythonFile(handle, mode="r")
            yield (
                lambda verify, metadata=footer: parquet_file(
                    source, verify=verify, metadata=metadata
                ),
                identity,
                True,
            )

    def _split_verified(
        self,
        index: int,
        identity: tuple[int, ...],
        groups: list[int],
        columns: Sequence[str],
        num_groups: int,
    ) -> tuple[list[int], list[int]]:
        """``groups`` split into those with a page of ``columns`` this handle has not verified
        in the file as it is (``identity``), and those whose pages it all has."""
        with self._verified_lock:
            seen = self._verified.get(index)
            if seen is None or seen[0] != identity:  # new, or changed since: verify afresh
                seen = self._verified[index] = (identity, {})
            done = np.ones(len(groups), dtype=bool)
            for column in columns:
                verified = seen[1].setdefault(column, np.zeros(num_groups, dtype=bool))
                done &= verified[groups]
        fresh = [g for g, ok in zip(groups, done, strict=True) if not ok]
        return fresh, [g for g, ok in zip(groups, done, strict=True) if ok]

    def _mark_verified(
        self, index: int, identity: tuple[int, ...], groups: list[int], columns: Sequence[str]
    ) -> None:
        with self._verified_lock:
            seen = self._verified.get(index)
            if seen is not None and seen[0] == identity:  # not since reset for a newer file
                for column in columns:
                    seen[1][column][groups] = True

    def _describe(self) -> str:
        if len(self._files) == 1:
            return f"'{self._store.url(self._files[0])}'"
        if not self._files:
            return "[]"
        return f"{len(self._files)} shards in '{self._store.url(self._files[0].parent)}'"

    def __repr__(self) -> str:
        return f"ShardedTable({self._describe()})"


def _in_group_order(
    first: list[int], a: pa.Table | None, second: list[int], b: pa.Table, sizes: list[int]
) -> pa.Table:
    """The row groups ``first`` (read as ``a``) and ``second`` (read as ``b``) as one table
    in row-group order (zero-copy slices)."""
    if a is None:
        return b
    pieces: list[tuple[int, pa.Table]] = []
    for groups, table in ((first, a), (second, b)):
        offset = 0
        for g in groups:
            pieces.append((g, table.slice(offset, sizes[g])))
            offset += sizes[g]
    return pa.concat_tables([t for _, t in sorted(pieces, key=lambda piece: piece[0])])


@contextmanager
def shard_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a missing or unreadable shard into a ``ShardError`` that names the file."""
    try:
        yield
    except FileNotFoundError as error:
        raise ShardError(
            f"Shard '{path}' disappeared since the table was listed: the data was moved or "
            "deleted after it was written."
        ) from error
    except (pa.ArrowInvalid, OSError) as error:
        raise corrupted(path, error) or ShardError(
            f"Shard '{path}' is not a readable parquet file (truncated or corrupted?): {error}"
        ) from error
