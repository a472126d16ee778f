"""A versioned Kedro dataset for a PEFT adapter: one directory of files per version."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from cartridges.datasets.versioned_folder import VersionedFolderDataset


class AdapterDataset(VersionedFolderDataset[dict[str, bytes]]):
    """Saves ``{file name: bytes}`` (what ``PeftModel.save_pretrained`` writes) as a directory.

    The saved directory is what ``PeftModel.from_pretrained(model, path)`` reads.

    Example catalog entry::

        lora_baseline:
          type: cartridges.datasets.AdapterDataset
          filepath: data/06_models/lora_baseline
          versioned: true
    """

    def load(self) -> dict[str, bytes]:
        folder = PurePosixPath(self._load_folder())
        return {name: self._store.read_bytes(folder / name) for name in self._files_of(str(folder))}

    def save(self, data: dict[str, bytes]) -> None:
        if "adapter_config.json" not in data:
            raise ValueError(f"Not a PEFT adapter: no adapter_config.json among {sorted(data)}.")
        for name in data:
            self._check_file_name(name, "Adapter file")

        def write(folder: Path) -> None:
            for name, content in data.items():
                (folder / name).write_bytes(content)

        self._save_folder(write)
