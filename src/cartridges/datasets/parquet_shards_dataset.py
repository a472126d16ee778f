"""A versioned Kedro dataset that stores a large table as a folder of parquet shards.

Teacher targets have one row per kept top-k entry: tens of millions of rows for a real run.
Shards keep each file a manageable size, let readers stream them, and keep writes atomic (the
version folder appears only once every shard is written).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from kedro.io import AbstractVersionedDataset, Version


class ParquetShardsDataset(AbstractVersionedDataset[pd.DataFrame, pd.DataFrame]):
    """Saves a DataFrame as ``part-00000.parquet, part-00001.parquet, ...`` in one folder.

    Example catalog entry::

        teacher_logprobs:
          type: cartridges.datasets.ParquetShardsDataset
          filepath: data/04_feature/teacher_logprobs
          rows_per_shard: 1000000
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        rows_per_shard: int = 1_000_000,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
        super().__init__(
            filepath=PurePosixPath(filepath),
            version=version,
            exists_function=lambda path: Path(path).is_dir(),
        )
        self._rows_per_shard = rows_per_shard
        self.metadata = metadata

    def shards(self) -> list[Path]:
        """The shard files of the version that would be loaded, in order."""
        return sorted(Path(self._get_load_path()).glob("part-*.parquet"))

    def load(self) -> pd.DataFrame:
        shards = self.shards()
        if not shards:
            raise FileNotFoundError(f"No parquet shard in '{self._get_load_path()}'.")
        return pd.concat([pd.read_parquet(path) for path in shards], ignore_index=True)

    def save(self, data: pd.DataFrame) -> None:
        target = Path(self._get_save_path())
        temporary = target.with_name(target.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        starts = range(0, max(len(data), 1), self._rows_per_shard)
        for index, start in enumerate(starts):
            shard = data.iloc[start : start + self._rows_per_shard]
            shard.to_parquet(temporary / f"part-{index:05d}.parquet", index=False)
        os.replace(temporary, target)

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "rows_per_shard": self._rows_per_shard,
            "version": self._version,
        }
