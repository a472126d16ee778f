"""A versioned Kedro dataset that stores a large table as a folder of parquet shards.

Teacher targets have one row per kept top-k entry: 10^8-10^9 rows for a real run. Shards keep
each file a manageable size and bounded row groups let readers fetch one conversation without
decoding a whole file. Loading returns a lazy :class:`~cartridges.tables.ShardedTable`: no
row is read until a consumer asks. Writes are atomic (the version folder appears only once
every shard is written), and a manifest of every shard's size and row count lets a load refuse
a version whose shard was deleted or truncated afterwards, instead of training on less data.
The manifest also keeps the table's ``attrs`` (the self-study run id, the lineage record).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import Version

from cartridges.datasets.versioned_folder import VersionedFolderDataset
from cartridges.files import make_read_only
from cartridges.tables import ShardedTable, ShardError, parquet_writer, write_parquet

MANIFEST = "_manifest.json"


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
    """

    def __init__(
        self,
        filepath: str,
        rows_per_shard: int = 1_000_000,
        row_group_size: int = 65_536,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}.")
        super().__init__(filepath, version, metadata)
        self._rows_per_shard = rows_per_shard
        self._row_group_size = row_group_size

    def shards(self) -> list[Path]:
        """The shard files of the version that would be loaded, in order."""
        folder = Path(self._get_load_path())
        manifest = folder / MANIFEST
        if manifest.is_file():
            return [folder / entry["file"] for entry in json.loads(manifest.read_text())["shards"]]
        return sorted(folder.glob("part-*.parquet"))  # versions written before the manifest

    def load(self) -> ShardedTable:
        folder = Path(self._get_load_path())
        if not folder.is_dir():
            raise FileNotFoundError(f"No saved version at '{folder}'.")
        manifest = folder / MANIFEST
        if manifest.is_file():
            self._check_manifest(folder, json.loads(manifest.read_text()))
        shards = self.shards()
        if not shards:
            raise FileNotFoundError(f"No parquet shard in '{folder}'.")
        return ShardedTable(shards, attrs=read_attrs(folder))

    def save(self, data: pd.DataFrame | ShardedTable) -> None:
        if isinstance(data, ShardedTable):
            write = self._writer_of_table(data)
        elif isinstance(data, pd.DataFrame):
            write = self._writer_of_frame(data)
        else:
            raise TypeError(
                f"ParquetShardsDataset saves a pandas DataFrame or a ShardedTable, got "
                f"{type(data).__name__}."
            )

        def write_with_manifest(folder: Path) -> None:
            names = write(folder)
            for name in names:  # read-only: shards may be hard links shared with a cache
                make_read_only(folder / name)
            entries = [
                {
                    "file": name,
                    "rows": pq.read_metadata(folder / name).num_rows,
                    "bytes": (folder / name).stat().st_size,
                }
                for name in names
            ]
            manifest = {"shards": entries, "attrs": data.attrs}
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))

        self._save_folder(write_with_manifest)

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

    def _writer_of_table(self, table: ShardedTable):
        schema = table.schema if table.files else None  # one schema, or a clear error, first

        def write(folder: Path) -> list[str]:
            names = []
            for index, source in enumerate(table.files):
                names.append(f"part-{index:05d}.parquet")
                target = folder / names[-1]
                footer = table.metadata(index)
                largest = max(
                    (footer.row_group(g).num_rows for g in range(footer.num_row_groups)), default=0
                )
                if largest <= self._row_group_size:
                    _link_or_copy(source, target)
                    continue
                with parquet_writer(target, schema) as writer:
                    for batch in ShardedTable([source]).iter_batches(
                        batch_size=self._row_group_size
                    ):
                        writer.write_batch(batch, row_group_size=self._row_group_size)
            return names

        return write

    @staticmethod
    def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            if not path.is_file():
                raise ShardError(
                    f"Shard '{path}' is missing: the version lists {len(manifest['shards'])} "
                    "shards; it was deleted after it was written. Re-run the stage that writes it."
                )
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ShardError(
                    f"Shard '{path}' has {size} bytes but was written with {entry['bytes']}: "
                    "it was truncated or changed after it was written. Re-run the stage that "
                    "writes it."
                )

    def _describe(self) -> dict[str, Any]:
        return super()._describe() | {
            "rows_per_shard": self._rows_per_shard,
            "row_group_size": self._row_group_size,
        }


def read_attrs(folder: str | os.PathLike) -> dict[str, Any]:
    """The table metadata (``attrs``: run id, lineage) saved with a version folder, if any."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text()).get("attrs") or {}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied): the file is read-only, and its page checksums are verified
    wherever it is read, so neither name can silently change what the other holds."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, target)
