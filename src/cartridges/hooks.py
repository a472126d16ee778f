"""Kedro hooks: under a distributed launcher, only rank 0 writes the run's outputs.

``torchrun --nproc-per-node N -m kedro run --pipeline distill_training`` starts N Kedro sessions.
All of them must train (each holds a shard of every global batch), but only rank 0 may save the
catalog's outputs. On the other ranks this hook wraps every persisted dataset so that its saves
stay in memory for the rest of the run while its loads still read the inputs from disk.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """The global rank set by torchrun (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankLocalDataset(AbstractDataset):
    """Reads the wrapped dataset until something is saved, then serves that from memory."""

    def __init__(self, inner: AbstractDataset) -> None:
        self._inner = inner
        self._memory: MemoryDataset | None = None

    def load(self) -> Any:
        return self._memory.load() if self._memory is not None else self._inner.load()

    def save(self, data: Any) -> None:
        self._memory = MemoryDataset(data, copy_mode="assign")

    def _exists(self) -> bool:
        return self._memory is not None or self._inner.exists()

    def _describe(self) -> dict[str, Any]:
        return {"rank_local": True, "inner": str(self._inner)}


class RankZeroOutputsHook:
    """Makes every rank but 0 keep its outputs in memory."""

    @hook_impl
    def after_catalog_created(self, catalog: DataCatalog) -> None:
        rank = process_rank()
        if rank == 0:
            return
        for name in list(catalog.keys()):
            if name.startswith("params:") or name == "parameters":
                continue
            dataset = catalog.get(name)
            if dataset is not None and not isinstance(dataset, MemoryDataset):
                catalog[name] = _RankLocalDataset(dataset)
        logger.info("Rank %d: outputs stay in memory; rank 0 writes them.", rank)
