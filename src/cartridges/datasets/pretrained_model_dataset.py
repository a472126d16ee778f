"""A Kedro dataset for a Hugging Face model and its tokenizer, saved as one directory."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kedro.io import AbstractDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.modeling import load_model
from cartridges.storage import MANIFEST, open_store


class PretrainedModelDataset(
    AbstractDataset[
        tuple[PreTrainedModel, PreTrainedTokenizerBase],
        tuple[PreTrainedModel, PreTrainedTokenizerBase],
    ]
):
    """``(model, tokenizer)`` through ``save_pretrained`` / :func:`cartridges.modeling.load_model`.

    Not versioned on purpose: the directory is what ``model.name_or_path`` points at. ``path``
    may be an fsspec URL (with ``credentials`` and ``fs_args``): loading downloads it first.
    """

    def __init__(
        self,
        path: str,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        self._store, location = open_store(path, credentials, fs_args)
        self._path = PurePosixPath(location)
        self.metadata = metadata

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if not self._exists():
            raise FileNotFoundError(
                f"No model saved at '{self._store.url(self._path)}' (on an object store, a save "
                f"cut short leaves no {MANIFEST}, so no model)."
            )
        with self._store.local_copy(self._path) as local:
            return load_model(str(local))

    def save(self, data: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
        """Replace the directory whole, never leaving a half-written model that
        ``model.name_or_path`` would load: a crash while writing keeps the previous model. On
        an object store (no rename) the upload then removes the old files first and writes the
        manifest last, so a crash during the upload leaves no model, which a load refuses."""
        model, tokenizer = data
        with self._store.write_folder(self._path, replace=True) as temporary:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)

    def _exists(self) -> bool:
        return self._store.is_complete_folder(self._path) and self._store.is_file(
            self._path / "config.json"
        )

    def _describe(self) -> dict[str, Any]:
        return {"path": self._store.url(self._path)}
