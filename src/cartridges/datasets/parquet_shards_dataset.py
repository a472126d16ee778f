"""A versioned Kedro dataset that stores a large table as a folder of parquet shards.

Teacher targets have one row per kept top-k entry: 10^8-10^9 rows for a real run. Shards keep
each file a manageable size and bounded row groups let readers fetch one conversation without
decoding a whole file. Loading returns a lazy :class:`~cartridges.tables.ShardedTable`: no
row is read until a consumer asks. Writes are atomic (the version folder appears only once
every shard is written), and a manifest of every shard's size and row count lets a load refuse
a version whose shard was deleted or truncated afterwards, instead of training on less data.
The manifest also keeps the table's ``attrs`` (the self-study run id, the lineage record).
The folder may be on an object store (an fsspec URL): the manifest is uploaded last and is the
version's commit, and reads fetch row groups by byte range.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import Version

from cartridges.datasets.versioned_folder import VersionedFolderDataset
from cartridges.files import make_read_only
from cartridges.storage import MANIFEST, Store, local_store
from cartridges.tables import ShardedTable, ShardError, parquet_writer, write_parquet


class ParquetShardsDataset(VersionedFolderDataset[ShardedTable]):
    """Saves a DataFrame or a :class:`ShardedTable` as ``part-00000.parquet, ...`` in one folder.

    A DataFrame is cut into shards of ``rows_per_shard`` rows. A ShardedTable keeps its files
    (whatever their names): each is hard-linked (copied across file systems) into the version,
    or rewritten batch by batch when its row groups exceed ``row_group_size``. Either way no
    more than one record batch is in memory.

    Example catalog entry::

        teacher_logprobs:
          type: cartridges.datasets.ParquetShardsDataset
          filepath: data/04_feature/teacher_logprobs
          rows_per_shard: 1000000
          row_group_size: 65536
          versioned: true

    ``filepath`` may be an fsspec URL (``s3://bucket/teacher_logprobs``), with Kedro's
    ``credentials`` and ``fs_args``.
    """

    def __init__(
        self,
        filepath: str,
        rows_per_shard: int = 1_000_000,
        row_group_size: int = 65_536,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}.")
        super().__init__(filepath, version, metadata, credentials, fs_args)
        self._rows_per_shard = rows_per_shard
        self._row_group_size = row_group_size

    def shards(self) -> list[PurePosixPath]:
        """The shard files of the version that would be loaded, in order (paths in its store:
        ``Path`` objects on a local disk)."""
        folder = PurePosixPath(str(self._get_load_path()))
        return self._shard_paths(folder, _manifest(self._store, folder))

    def _shard_paths(
        self, folder: PurePosixPath, manifest: dict[str, Any] | None
    ) -> list[PurePosixPath]:
        if manifest is not None:
            names = [entry["file"] for entry in manifest["shards"]]
        else:  # versions written before the manifest
            names = [
                n
                for n in self._store.children(folder)
                if n.startswith("part-") and n.endswith(".parquet")
            ]
        kind = Path if self._store.is_local else PurePosixPath
        return [kind(folder / name) for name in names]

    def load(self) -> ShardedTable:
        folder = PurePosixPath(self._load_folder())
        manifest = _manifest(self._store, folder)
        if manifest is not None:
            self._check_manifest(self._store, folder, manifest)
        shards = self._shard_paths(folder, manifest)
        if not shards:
            raise FileNotFoundError(f"No parquet shard in '{self._store.url(folder)}'.")
        attrs = (manifest or {}).get("attrs") or {}
        return ShardedTable(shards, attrs=attrs, store=self._store)

    def save(self, data: pd.DataFrame | ShardedTable) -> None:
        copies: list[tuple[str, str, str]] = []  # shards the store copies itself
        copied: dict[str, dict[str, Any]] = {}  # their manifest entries
        if isinstance(data, ShardedTable):
            write = self._writer_of_table(data, copies, copied)
        elif isinstance(data, pd.DataFrame):
            write = self._writer_of_frame(data)
        else:
            raise TypeError(
                f"ParquetShardsDataset saves a pandas DataFrame or a ShardedTable, got "
                f"{type(data).__name__}."
            )

        def write_with_manifest(folder: Path) -> None:
            names = write(folder)
            entries = []
            for name in names:
                if name in copied:
                    entries.append(copied[name])
                    continue
                make_read_only(folder / name)  # shards may be hard links shared with a cache
                rows = pq.read_metadata(folder / name).num_rows
                entries.append(
                    {"file": name, "rows": rows, "bytes": (folder / name).stat().st_size}
                )
            manifest = {"shards": entries, "attrs": data.attrs}  # written last: the commit
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))

        self._save_folder(write_with_manifest, copies)

    # ------------------------------------------------------------------ writers
    def _writer_of_frame(self, data: pd.DataFrame):
        def write(folder: Path) -> list[str]:
            names = []
            for index, start in enumerate(range(0, max(len(data), 1), self._rows_per_shard)):
                shard = pa.Table.from_pandas(
                    data.iloc[start : start + self._rows_per_shard], preserve_index=False
                )
                names.append(f"part-{index:05d}.parquet")
                write_parquet(shard, folder / names[-1], row_group_size=self._row_group_size)
            return names

        return write

    def _writer_of_table(
        self,
        table: ShardedTable,
        copies: list[tuple[str, str, str]],
        copied: dict[str, dict[str, Any]],
    ):
        """Shards whose row groups fit are linked (a disk), copied by the store (both on one
        object store: nothing downloaded) or downloaded; the others are rewritten."""
        schema = table.schema if table.files else None  # one schema, or a clear error, first
        # Into a new version only: an unversioned entry is replaced, and its old files (maybe
        # this table's sources) are removed before the copies would run.
        server_side = (
            not self._store.is_local
            and table.store.fs == self._store.fs
            and self._version is not None
        )

        def write(folder: Path) -> list[str]:
            names = []
            for index, source in enumerate(table.files):
                names.append(f"part-{index:05d}.parquet")
                target = folder / names[-1]
                footer = table.metadata(index)
                largest = max(
                    (footer.row_group(g).num_rows for g in range(footer.num_row_groups)), default=0
                )
                if largest <= self._row_group_size and server_side:
                    # The copy is conditional on the ETag read just after the footer: a shard
                    # rewritten after that fails the save instead of differing from its entry.
                    size, etag = table.store.identity(source)
                    copies.append((str(source), names[-1], etag))
                    entry = {"file": names[-1], "rows": footer.num_rows, "bytes": size}
                    copied[names[-1]] = entry
                    continue
                if largest <= self._row_group_size:
                    _link_or_copy(table.store, source, target)
                    continue
                with parquet_writer(target, schema) as writer:
                    for batch in ShardedTable([source], store=table.store).iter_batches(
                        batch_size=self._row_group_size
                    ):
                        writer.write_batch(batch, row_group_size=self._row_group_size)
            return names

        return write

    @staticmethod
    def _check_manifest(store: Store, folder: PurePosixPath, manifest: dict[str, Any]) -> None:
        present = store.file_sizes(folder)  # one listing: a HEAD per shard is slow at 10^5
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            if entry["file"] not in present:
                raise ShardError(
                    f"Shard '{store.url(path)}' is missing: the version lists "
                    f"{len(manifest['shards'])} shards; it was deleted after it was written. "
                    "Re-run the stage that writes it."
                )
            size = present[entry["file"]]
            if size != entry["bytes"]:
                raise ShardError(
                    f"Shard '{store.url(path)}' has {size} bytes but was written with "
                    f"{entry['bytes']}: "
                    "it was truncated or changed after it was written. Re-run the stage that "
                    "writes it."
                )

    def _describe(self) -> dict[str, Any]:
        return super()._describe() | {
            "rows_per_shard": self._rows_per_shard,
            "row_group_size": self._row_group_size,
        }


def read_attrs(folder: str | os.PathLike, store: Store | None = None) -> dict[str, Any]:
    """The table metadata (``attrs``: run id, lineage) saved with a version folder, if any."""
    manifest = _manifest(store or local_store(), PurePosixPath(str(folder)))
    return (manifest or {}).get("attrs") or {}


def _manifest(store: Store, folder: PurePosixPath) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_text(folder / MANIFEST))
    except FileNotFoundError:
        return None


def _link_or_copy(store: Store, source: Path | PurePosixPath, target: Path) -> None:
    """A hard link (no bytes copied) of a local file: it is read-only, and its page checksums are
    verified wherever it is read, so neither name can silently change what the other holds. A
    file on an object store is downloaded."""
    if not store.is_local:
        store.fs.get_file(str(source), str(target))
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, target)
