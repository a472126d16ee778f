"""Question sets: JSONL files of ``{"question", "answer", "options"?, "document"?}`` records.

Read with our own loader rather than pandas' JSON reader, so that a bad record is reported with
its line number and what is wrong with it, before any model is loaded.
"""

from __future__ import annotations

import io
import json
import os
import string
from dataclasses import dataclass

from cartridges.storage import Store, local_store

LETTERS = string.ascii_uppercase


class QuestionsError(ValueError):
    """A questions file that cannot be evaluated on."""


@dataclass(frozen=True)
class Question:
    """One question with its reference answer; ``options`` make it multiple choice.

    For a multiple-choice question ``answer`` is the index of the correct option, kept as the
    option's text (the file may give the text or its letter: ``"B"``).
    """

    question: str
    answer: str
    options: tuple[str, ...] | None = None
    document: str | None = None
    """The document the question is about, by name (its file name without extension, see
    :func:`cartridges.corpus.document_name`), when the file says: a cartridge of one document
    is scored on its own document's questions."""

    @property
    def answer_index(self) -> int:
        if self.options is None:
            raise ValueError("Only a multiple-choice question has an answer index.")
        return self.options.index(self.answer)


def load_questions(path: str | os.PathLike, store: Store | None = None) -> list[Question]:
    """Read and check a questions file (local, or in ``store``); every error names the file
    and the line.

    Raises:
        QuestionsError: the file is missing, or a line is not a valid question record, or the
            file holds no question.
    """
    store = store or local_store()
    where = store.url(path)
    try:
        text = store.read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        raise QuestionsError(
            f"Questions file '{where}' not found: write one JSON object per line "
            '({"question": ..., "answer": ..., "options": [...] optional}) there, or point '
            "the `questions` catalog entry (conf/base/catalog.yml) at your file."
        ) from None
    questions = [
        _parse(line, f"{where} line {number}")
        # universal newlines as a file read has them: not str.splitlines, which also cuts at
        # U+2028 and the like, which an answer may hold (saved unescaped)
        for number, line in enumerate(io.StringIO(text, newline=None), start=1)
        if line.strip()
    ]
    if not questions:
        raise QuestionsError(f"Questions file '{where}' holds no question (it is empty).")
    return questions


def _parse(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise QuestionsError(f"{where}: not valid JSON ({error.msg}).") from None
    if not isinstance(record, dict):
        raise QuestionsError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise QuestionsError(f"{where}: '{key}' must be a non-empty string.")
    document = record.get("document")
    if document is not None and (not isinstance(document, str) or not document.strip()):
        raise QuestionsError(
            f"{where}: 'document' must be a non-empty string (a document's file name)."
        )
    options = record.get("options")
    if options is None:
        return Question(record["question"], record["answer"], document=document)
    if not isinstance(options, list) or not all(isinstance(o, str) and o for o in options):
        raise QuestionsError(f"{where}: 'options' must be a list of non-empty strings.")
    if len(options) < 2:
        raise QuestionsError(
            f"{where}: 'options' has {len(options)} entry; a multiple-choice question needs at "
            "least 2 (drop 'options' for an open question)."
        )
    if len(options) > len(LETTERS):
        raise QuestionsError(f"{where}: at most {len(LETTERS)} options, got {len(options)}.")
    if len(set(options)) != len(options):
        raise QuestionsError(f"{where}: 'options' has duplicate entries.")
    return Question(
        record["question"],
        _answer_option(record["answer"], options, where),
        tuple(options),
        document,
    )


def _answer_option(answer: str, options: list[str], where: str) -> str:
    """The option the reference answer designates: its exact text or its letter."""
    if answer in options:
        return answer
    letter = answer.strip().strip("().").upper()
    if len(letter) == 1 and letter in LETTERS[: len(options)]:
        return options[LETTERS.index(letter)]
    raise QuestionsError(
        f"{where}: answer {answer!r} is neither one of the options nor a letter "
        f"A-{LETTERS[len(options) - 1]}."
    )


def prompt_text(question: Question) -> str:
    """What the model is asked: the question, and for multiple choice the lettered options."""
    if question.options is None:
        return question.question
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options)]
    return (
        f"{question.question}\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the option."
    )
