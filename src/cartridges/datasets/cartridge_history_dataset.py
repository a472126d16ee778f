"""Every saved version of a versioned cartridge entry, for comparing several in one report."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, Version

from cartridges.cartridge import Cartridge
from cartridges.datasets.cartridge_dataset import CartridgeDataset
from cartridges.storage import open_store


class CartridgeHistory:
    """The versions of a cartridge entry; each loads on demand (tensors are read lazily)."""

    def __init__(
        self,
        filepath: str,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        self.filepath = filepath
        self._options = {"credentials": credentials, "fs_args": fs_args}
        self._store, self._root = open_store(filepath, credentials, fs_args)

    def versions(self) -> list[str]:
        """Saved versions, oldest first."""
        root = PurePosixPath(self._root)
        return [
            name
            for name in self._store.children(root)
            if self._store.is_file(root / name / root.name)
        ]

    def load(self, version: str) -> Cartridge:
        """One version; an unknown one is refused with the versions there are."""
        if version not in self.versions():
            raise FileNotFoundError(
                f"Cartridge version {version!r} not found under '{self.filepath}'; available: "
                f"{self.versions()}."
            )
        cartridge = CartridgeDataset(
            self.filepath, version=Version(version, None), **self._options
        ).load()
        cartridge.info.extra["catalog_version"] = version
        return cartridge


class CartridgeHistoryDataset(AbstractDataset[CartridgeHistory, None]):
    """Read-only view of every version under a versioned ``CartridgeDataset``'s filepath.

    Example catalog entry (the path is the ``cartridge`` entry's)::

        cartridge_history:
          type: cartridges.datasets.CartridgeHistoryDataset
          filepath: data/06_models/cartridge.safetensors
    """

    def __init__(
        self,
        filepath: str,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        self._history = CartridgeHistory(filepath, credentials, fs_args)
        self._filepath = filepath
        self.metadata = metadata

    def load(self) -> CartridgeHistory:
        return self._history

    def save(self, data: Any) -> None:
        raise NotImplementedError("cartridge_history is read-only: save to the cartridge entry.")

    def _exists(self) -> bool:
        return bool(self._history.versions())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
