"""A versioned Kedro dataset for cartridge checkpoints (one safetensors file per version)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cartridges import lineage
from cartridges.cartridge import Cartridge
from cartridges.checkpoint import (
    CartridgeFormatError,
    load_cartridge,
    read_metadata,
    save_cartridge,
)
from cartridges.datasets.versioned_folder import VersionedStoreDataset
from cartridges.storage import Store

T = TypeVar("T")


class CartridgeDataset(VersionedStoreDataset[Cartridge]):
    """Saves and loads :class:`~cartridges.cartridge.Cartridge` objects.

    Example catalog entry::

        cartridge:
          type: cartridges.datasets.CartridgeDataset
          filepath: data/06_models/cartridge.safetensors
          versioned: true

    ``filepath`` may be an fsspec URL (``s3://bucket/cartridge.safetensors``), with Kedro's
    ``credentials`` and ``fs_args``.
    """

    def _is_saved(self, path: str) -> bool:
        return self._store.is_file(path)

    def load(self) -> Cartridge:
        cartridge = read_cartridge_file(self._store, self._get_load_path(), load_cartridge)
        if self._version is not None:
            # Reports name the exact version they evaluated (the latest resolves to a timestamp).
            version = self.resolve_load_version()
            saved_as = (cartridge.info.extra.get(lineage.LINEAGE) or {}).get("version")
            if saved_as and saved_as != version:
                raise CartridgeFormatError(
                    f"The cartridge in version {version} of '{self._store.url(self._filepath)}' "
                    "records that it "
                    f"was saved as version {saved_as}: it was copied into another version's "
                    f"folder. Load it as --load-versions=<entry>:{saved_as} from its own folder, "
                    "or save it anew."
                )
            cartridge.info.extra["catalog_version"] = version
        return cartridge

    def save(self, data: Cartridge) -> None:
        with self._store.write_file(self._get_save_path()) as temporary:
            save_cartridge(data, temporary)

    def header(self) -> dict[str, str]:
        """The metadata of the version that would be loaded (model, p, initialiser, ...)."""
        return read_cartridge_file(self._store, self._get_load_path(), read_metadata)


def read_cartridge_file(store: Store, path: Any, read: Callable[[Any], T]) -> T:
    """``read`` of a cartridge file in ``store`` (downloaded first from an object store), its
    errors naming the file where it is."""
    with store.local_copy(path) as local:
        try:
            return read(local)
        except CartridgeFormatError as error:
            if store.is_local:
                raise
            raise CartridgeFormatError(str(error).replace(str(local), store.url(path))) from error
