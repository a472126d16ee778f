"""A versioned Kedro dataset that stores a large table as a folder of parquet shards.

Teacher targets have one row per kept top-k entry: tens of millions of rows for a real run.
Shards keep each file a manageable size, let readers stream them, and keep writes atomic (the
version folder appears only once every shard is written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import Version

from cartridges.datasets.versioned_folder import VersionedFolderDataset


class ParquetShardsDataset(VersionedFolderDataset[pd.DataFrame]):
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
        super().__init__(filepath, version, metadata)
        self._rows_per_shard = rows_per_shard

    def shards(self) -> list[Path]:
        """The shard files of the version that would be loaded, in order."""
        return sorted(Path(self._get_load_path()).glob("part-*.parquet"))

    def load(self) -> pd.DataFrame:
        shards = self.shards()
        if not shards:
            raise FileNotFoundError(f"No parquet shard in '{self._get_load_path()}'.")
        return pd.concat([pd.read_parquet(path) for path in shards], ignore_index=True)

    def save(self, data: pd.DataFrame) -> None:
        def write(folder: Path) -> None:
            starts = range(0, max(len(data), 1), self._rows_per_shard)
            for index, start in enumerate(starts):
                shard = data.iloc[start : start + self._rows_per_shard]
                shard.to_parquet(folder / f"part-{index:05d}.parquet", index=False)

        self._save_folder(write)

    def _describe(self) -> dict[str, Any]:
        return super()._describe() | {"rows_per_shard": self._rows_per_shard}
