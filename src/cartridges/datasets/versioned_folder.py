"""Base of the versioned datasets that save one folder of files per version, atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from kedro.io import AbstractVersionedDataset, Version

from cartridges.storage import MANIFEST, Store, open_store

T = TypeVar("T")


class VersionedStoreDataset(AbstractVersionedDataset[T, T]):
    """A versioned dataset on a local disk or an object store (any fsspec URL, with Kedro's
    ``credentials`` and ``fs_args``); a subclass says what a saved version is (:meth:`_is_saved`).
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        self._store, path = open_store(filepath, credentials, fs_args)
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._is_saved,
            glob_function=self._store.fs.glob,
        )
        self.metadata = metadata

    def _is_saved(self, path: str) -> bool:
        raise NotImplementedError

    @property
    def store(self) -> Store:
        return self._store

    def _exists(self) -> bool:
        try:
            return self._is_saved(str(self._get_load_path()))
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._store.url(self._filepath), "version": self._version}


class VersionedFolderDataset(VersionedStoreDataset[T]):
    """A version is a folder, written whole before it counts: locally beside its final name and
    renamed, on a store uploaded with its manifest last, so a crash mid-save never leaves a
    half-written version that a later load would pick up.
    """

    def _is_saved(self, path: str) -> bool:
        return self._store.is_complete_folder(path)

    def _load_folder(self) -> str:
        """The folder of the version to load; a clear error when there is none."""
        folder = str(self._get_load_path())
        if not self._store.is_complete_folder(folder):
            raise FileNotFoundError(f"No saved version at '{self._store.url(folder)}'.")
        return folder

    def _save_folder(
        self, write: Callable[[Path], None], copies: list[tuple[str, str, str]] | None = None
    ) -> None:
        """Run ``write`` on an empty local folder, then make it the version's folder, whole
        (with the ``copies`` ``write`` asked for: see :meth:`Store.write_folder`)."""
        # An unversioned entry is rewritten by every run: replace it whole, never in place.
        with self._store.write_folder(
            self._get_save_path(), replace=self._version is None, copies=copies
        ) as temporary:
            write(temporary)

    def _files_of(self, folder: str) -> list[str]:
        """The data files of a saved version folder (its manifest left out)."""
        return [name for name in self._store.children(folder) if name != MANIFEST]

    @staticmethod
    def _check_file_name(name: str, what: str) -> None:
        if Path(name).name != name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"{what} name {name!r} must be a plain file name.")
