"""A versioned Kedro dataset for a named set of cartridges (e.g. one per size p)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version

from cartridges.cartridge import Cartridge
from cartridges.checkpoint import load_cartridge, save_cartridge


class CartridgeSetDataset(AbstractVersionedDataset[dict[str, Cartridge], dict[str, Cartridge]]):
    """Saves ``{name: Cartridge}`` as ``<version>/<name>.safetensors`` files in one folder.

    Example catalog entry::

        cartridge_sweep:
          type: cartridges.datasets.CartridgeSetDataset
          filepath: data/06_models/cartridge_sweep
          versioned: true
    """

    def __init__(
        self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            filepath=PurePosixPath(filepath),
            version=version,
            exists_function=lambda path: Path(path).is_dir(),
        )
        self.metadata = metadata

    def load(self) -> dict[str, Cartridge]:
        folder = Path(self._get_load_path())
        return {path.stem: load_cartridge(path) for path in sorted(folder.glob("*.safetensors"))}

    def save(self, data: dict[str, Cartridge]) -> None:
        target = Path(self._get_save_path())
        temporary = target.with_name(target.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        for name, cartridge in data.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"Cartridge name {name!r} must be a plain file name.")
            save_cartridge(cartridge, temporary / f"{name}.safetensors")
        os.replace(temporary, target)

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}
