"""A Kedro dataset for a Hugging Face model and its tokenizer, saved as one directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.files import atomic_folder
from cartridges.modeling import load_model


class PretrainedModelDataset(
    AbstractDataset[
        tuple[PreTrainedModel, PreTrainedTokenizerBase],
        tuple[PreTrainedModel, PreTrainedTokenizerBase],
    ]
):
    """``(model, tokenizer)`` through ``save_pretrained`` / :func:`cartridges.modeling.load_model`.

    Not versioned on purpose: the directory is what ``model.name_or_path`` points at.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_model(str(self._path))

    def save(self, data: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
        """Replace the directory whole: a crash mid-save keeps the previous model, never a
        half-written one that ``model.name_or_path`` would load."""
        model, tokenizer = data
        with atomic_folder(self._path, replace=True) as temporary:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)

    def _exists(self) -> bool:
        return (self._path / "config.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
