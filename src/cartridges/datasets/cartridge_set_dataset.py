"""A versioned Kedro dataset for a named set of cartridges (e.g. one per size p)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from cartridges.cartridge import Cartridge
from cartridges.checkpoint import load_cartridge, save_cartridge
from cartridges.datasets.cartridge_dataset import read_cartridge_file
from cartridges.datasets.versioned_folder import VersionedFolderDataset


class CartridgeSetDataset(VersionedFolderDataset[dict[str, Cartridge]]):
    """Saves ``{name: Cartridge}`` as ``<version>/<name>.safetensors`` files in one folder.

    Example catalog entry::

        cartridge_sweep:
          type: cartridges.datasets.CartridgeSetDataset
          filepath: data/06_models/cartridge_sweep
          versioned: true
    """

    def load(self) -> dict[str, Cartridge]:
        folder = PurePosixPath(self._load_folder())
        return {
            PurePosixPath(name).stem: read_cartridge_file(
                self._store, folder / name, load_cartridge
            )
            for name in self._files_of(str(folder))
            if name.endswith(".safetensors")
        }

    def save(self, data: dict[str, Cartridge]) -> None:
        for name in data:
            self._check_file_name(name, "Cartridge")

        def write(folder: Path) -> None:
            for name, cartridge in data.items():
                save_cartridge(cartridge, folder / f"{name}.safetensors")

        self._save_folder(write)
