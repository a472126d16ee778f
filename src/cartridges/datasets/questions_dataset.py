"""The evaluation questions as a catalog dataset: a JSONL file checked line by line."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from cartridges.evaluation.questions import Question, load_questions


class QuestionsDataset(AbstractDataset[list[Question], list[Question]]):
    """Loads ``{"question", "answer", "options"?}`` records; a bad line is named by number.

    Example catalog entry::

        questions:
          type: cartridges.datasets.QuestionsDataset
          filepath: data/01_raw/questions.jsonl
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> list[Question]:
        return load_questions(self._filepath)

    def save(self, data: list[Question]) -> None:
        path = Path(self._filepath)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for question in data:
                record: dict[str, Any] = {"question": question.question, "answer": question.answer}
                if question.options is not None:
                    record["options"] = list(question.options)
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
