"""A versioned Kedro dataset for cartridge checkpoints (one safetensors file per version)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version

from cartridges import lineage
from cartridges.cartridge import Cartridge
from cartridges.checkpoint import (
    CartridgeFormatError,
    load_cartridge,
    read_metadata,
    save_cartridge,
)


class CartridgeDataset(AbstractVersionedDataset[Cartridge, Cartridge]):
    """Saves and loads :class:`~cartridges.cartridge.Cartridge` objects.

    Example catalog entry::

        cartridge:
          type: cartridges.datasets.CartridgeDataset
          filepath: data/06_models/cartridge.safetensors
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            filepath=PurePosixPath(filepath), version=version, exists_function=self._exists_path
        )
        self.metadata = metadata

    @staticmethod
    def _exists_path(path: str) -> bool:
        return Path(path).is_file()

    def load(self) -> Cartridge:
        cartridge = load_cartridge(self._get_load_path())
        if self._version is not None:
            # Reports name the exact version they evaluated (the latest resolves to a timestamp).
            version = self.resolve_load_version()
            saved_as = (cartridge.info.extra.get(lineage.LINEAGE) or {}).get("version")
            if saved_as and saved_as != version:
                raise CartridgeFormatError(
                    f"The cartridge in version {version} of '{self._filepath}' records that it "
                    f"was saved as version {saved_as}: it was copied into another version's "
                    f"folder. Load it as --load-versions=<entry>:{saved_as} from its own folder, "
                    "or save it anew."
                )
            cartridge.info.extra["catalog_version"] = version
        return cartridge

    def save(self, data: Cartridge) -> None:
        save_cartridge(data, self._get_save_path())

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False
        return self._exists_path(str(path))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}

    def header(self) -> dict[str, str]:
        """The metadata of the version that would be loaded (model, p, initialiser, ...)."""
        return read_metadata(self._get_load_path())
