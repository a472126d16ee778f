"""Every saved version of a versioned cartridge entry, for comparing several in one report."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, Version

from cartridges.cartridge import Cartridge
from cartridges.datasets.cartridge_dataset import CartridgeDataset


class CartridgeHistory:
    """The versions of a cartridge entry; each loads on demand (tensors are read lazily)."""

    def __init__(self, filepath: str) -> None:
        self.filepath = filepath

    def versions(self) -> list[str]:
        """Saved versions, oldest first."""
        root = Path(self.filepath)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / root.name).is_file())

    def load(self, version: str) -> Cartridge:
        """One version; an unknown one is refused with the versions there are."""
        if version not in self.versions():
            raise FileNotFoundError(
                f"Cartridge version {version!r} not found under '{self.filepath}'; available: "
                f"{self.versions()}."
            )
        cartridge = CartridgeDataset(self.filepath, version=Version(version, None)).load()
        cartridge.info.extra["catalog_version"] = version
        return cartridge


class CartridgeHistoryDataset(AbstractDataset[CartridgeHistory, None]):
    """Read-only view of every version under a versioned ``CartridgeDataset``'s filepath.

    Example catalog entry (the path is the ``cartridge`` entry's)::

        cartridge_history:
          type: cartridges.datasets.CartridgeHistoryDataset
          filepath: data/06_models/cartridge.safetensors
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = str(PurePosixPath(filepath))
        self.metadata = metadata

    def load(self) -> CartridgeHistory:
        return CartridgeHistory(self._filepath)

    def save(self, data: Any) -> None:
        raise NotImplementedError("cartridge_history is read-only: save to the cartridge entry.")

    def _exists(self) -> bool:
        return Path(self._filepath).is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
