"""A versioned Kedro dataset for a PEFT adapter: one directory of files per version."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version


class AdapterDataset(AbstractVersionedDataset[dict[str, bytes], dict[str, bytes]]):
    """Saves ``{file name: bytes}`` (what ``PeftModel.save_pretrained`` writes) as a directory.

    The saved directory is what ``PeftModel.from_pretrained(model, path)`` reads.

    Example catalog entry::

        lora_baseline:
          type: cartridges.datasets.AdapterDataset
          path: data/06_models/lora_baseline
          versioned: true
    """

    def __init__(
        self, path: str, version: Version | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            filepath=PurePosixPath(path), version=version, exists_function=self._exists_path
        )
        self.metadata = metadata

    @staticmethod
    def _exists_path(path: str) -> bool:
        return (Path(path) / "adapter_config.json").is_file()

    def load(self) -> dict[str, bytes]:
        directory = Path(self._get_load_path())
        return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}

    def save(self, data: dict[str, bytes]) -> None:
        if "adapter_config.json" not in data:
            raise ValueError(f"Not a PEFT adapter: no adapter_config.json among {sorted(data)}.")
        directory = Path(self._get_save_path())
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in data.items():
            if Path(name).name != name:
                raise ValueError(f"Adapter file names must be plain names, got {name!r}.")
            (directory / name).write_bytes(content)

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False
        return self._exists_path(str(path))

    def _describe(self) -> dict[str, Any]:
        return {"path": self._filepath, "version": self._version}
