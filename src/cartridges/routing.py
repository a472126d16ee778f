"""Choosing which document cartridges answer a question: a retriever over the documents' text.

A library of cartridges, one per document, answers a question with the few whose documents the
question is about ("Cartridges at Scale": per-document cartridges selected per question keep
most of their accuracy, where blindly composing all of them does not). A :class:`Retriever`
scores each document of the library for a query; :func:`select` keeps the ``top_k`` best and
returns them in the library's order, so that the same set always composes into the same KV
(positions and all), whatever the ranking.

The default retriever is BM25 (the ``bm25s`` library) over passages of each document, a
document scoring as its best passage: a long document is not favoured for its length, and a
question about one paragraph finds it. Any object with ``scores(query) -> [documents]`` plugs in
(``retriever: "package.module:Class"``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Annotated, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

__all__ = [
    "BM25Retriever",
    "RETRIEVERS",
    "Retriever",
    "RoutingConfig",
    "make_retriever",
    "select",
]

_WORD = re.compile(r"\S+")


@runtime_checkable
class Retriever(Protocol):
    """Scores documents for a query: higher is more relevant, one score per document."""

    def scores(self, query: str) -> np.ndarray:
        """``[documents]`` relevance of each document, in the order it was built with."""
        ...


class BM25Retriever:
    """BM25 over overlapping passages of each document; a document scores its best passage.

    Args:
        texts: the documents' texts, in the library's order.
        passage_words: words per passage (passages overlap by half, so that no sentence is only
            ever cut in two).
        stopwords: a language ``bm25s`` knows (``"en"``) or ``None`` to keep every word.
    """

    def __init__(
        self, texts: Sequence[str], passage_words: int = 128, stopwords: str | None = "en"
    ) -> None:
        import bm25s  # optional at import: only evaluation and serving with routing need it

        if passage_words < 1:
            raise ValueError(f"passage_words must be >= 1, got {passage_words}.")
        if not texts:
            raise ValueError("A retriever needs at least one document.")
        self._bm25s = bm25s
        self._stopwords = stopwords
        passages: list[str] = []
        owner: list[int] = []
        for index, text in enumerate(texts):
            pieces = _passages(text, passage_words) or [""]
            passages += pieces
            owner += [index] * len(pieces)
        self._owner = np.asarray(owner)
        self._documents = len(texts)
        self._index = bm25s.BM25()
        tokens = bm25s.tokenize(passages, stopwords=stopwords, show_progress=False)
        if not tokens.vocab:
            raise ValueError(
                "The documents have no word to index (empty, or only stopwords and one-letter "
                "words): BM25 cannot route between them."
            )
        self._index.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        words = self._bm25s.tokenize(
            [query], stopwords=self._stopwords, return_ids=False, show_progress=False
        )[0]
        known = [w for w in words if w in self._index.vocab_dict]
        per_passage = (
            self._index.get_scores(known) if known else np.zeros(len(self._owner), np.float32)
        )
        best = np.full(self._documents, -np.inf, dtype=np.float64)
        np.maximum.at(best, self._owner, per_passage)
        return best


def _passages(text: str, words: int) -> list[str]:
    """Windows of ``words`` words, each starting half a window after the last; the last one
    ends with the text."""
    tokens = _WORD.findall(text)
    step = max(words // 2, 1)
    starts = list(range(0, max(len(tokens) - words, 0) + 1, step))
    if starts and starts[-1] + words < len(tokens):
        starts.append(len(tokens) - words)
    return [" ".join(tokens[start : start + words]) for start in starts if tokens]


def select(scores: np.ndarray, names: Sequence[str], top_k: int) -> tuple[str, ...]:
    """The ``top_k`` best-scored of ``names``, in the order of ``names`` (ties: earlier first).

    Raises:
        ValueError: ``top_k`` below 1 or ``scores`` not one per name.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if len(scores) != len(names):
        raise ValueError(f"{len(scores)} scores for {len(names)} documents.")
    best = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top_k]
    return tuple(names[i] for i in sorted(best))


RETRIEVERS: dict[str, Callable[..., Retriever]] = {"bm25": BM25Retriever}
"""Retrievers by the name the ``routing.retriever`` setting gives."""


def make_retriever(name: str, texts: Sequence[str], **options: Any) -> Retriever:
    """The retriever ``name`` (a key of :data:`RETRIEVERS` or ``"module:Class"``) over ``texts``.

    Raises:
        ValueError: an unknown name, or a class that does not score documents.
    """
    factory = RETRIEVERS.get(name)
    if factory is None:
        module, _, attribute = name.partition(":")
        if not attribute:
            raise ValueError(
                f"Unknown retriever {name!r}: choose from {sorted(RETRIEVERS)} or give "
                "'package.module:Class'."
            )
        try:
            factory = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Cannot load retriever {name!r}: {error}") from None
    retriever = factory(texts, **options)
    if not isinstance(retriever, Retriever):
        raise ValueError(f"Retriever {name!r} has no scores(query) method.")
    return retriever


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RoutingConfig:
    """How a library of document cartridges is routed per question.

    Args:
        top_k: cartridges loaded per question, composed in the library's order; 0: no routing.
        retriever: a key of :data:`RETRIEVERS` or ``"package.module:Class"``, built with the
            documents' texts and ``retriever_options``.
        retriever_options: keyword arguments of the retriever (BM25: ``passage_words``,
            ``stopwords``).
        oracle: also score the oracle selection (each question's own document), the bound
            routing is measured against.
    """

    top_k: Annotated[int, Field(ge=0)] = 0
    retriever: str = "bm25"
    retriever_options: dict[str, Any] = field(default_factory=dict)
    oracle: bool = True
