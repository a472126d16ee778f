"""The evaluation questions as a catalog dataset: a JSONL file checked line by line."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from cartridges.evaluation.questions import Question, load_questions
from cartridges.storage import open_store


class QuestionsDataset(AbstractDataset[list[Question], list[Question]]):
    """Loads ``{"question", "answer", "options"?}`` records; a bad line is named by number.

    Example catalog entry (``filepath`` may be an fsspec URL, with ``credentials`` and
    ``fs_args``)::

        questions:
          type: cartridges.datasets.QuestionsDataset
          filepath: data/01_raw/questions.jsonl
    """

    def __init__(
        self,
        filepath: str,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        self._store, path = open_store(filepath, credentials, fs_args)
        self._filepath = PurePosixPath(path)
        self.metadata = metadata

    def load(self) -> list[Question]:
        return load_questions(self._filepath, self._store)

    def save(self, data: list[Question]) -> None:
        lines = []
        for question in data:
            record: dict[str, Any] = {"question": question.question, "answer": question.answer}
            if question.options is not None:
                record["options"] = list(question.options)
            if question.document is not None:
                record["document"] = question.document
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        self._store.write_bytes(self._filepath, "".join(lines).encode("utf-8"))

    def _exists(self) -> bool:
        return self._store.is_file(self._filepath)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._store.url(self._filepath)}
