"""Base of the versioned datasets that save one folder of files per version, atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from kedro.io import AbstractVersionedDataset, Version

from cartridges.files import atomic_folder

T = TypeVar("T")


class VersionedFolderDataset(AbstractVersionedDataset[T, T]):
    """A version is a folder; it is written beside its final name and renamed when complete,
    so a crash mid-save never leaves a half-written version that a later load would pick up.
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

    def _save_folder(self, write: Callable[[Path], None]) -> None:
        """Run ``write`` on an empty temporary folder, then move it to the version's path."""
        # An unversioned entry is rewritten by every run: replace it whole, never in place.
        with atomic_folder(self._get_save_path(), replace=self._version is None) as temporary:
            write(temporary)

    @staticmethod
    def _check_file_name(name: str, what: str) -> None:
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{what} name {name!r} must be a plain file name.")

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}
