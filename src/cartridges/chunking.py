"""Cut tokenised documents into the chunks that self-study conversations are about.

Two ways, picked by ``ChunkingConfig.method``:

- ``token_windows``: windows of random lengths in ``min_tokens..max_tokens`` that tile every
  document, pass after pass, in shuffled order: documents get windows in proportion to their
  length (as with the paper's sampler) and every token, ends included, is in the first pass.
  Only the documents drawn are tokenised.
- ``structural``: every document cut at paragraphs and section headings, pieces merged up to
  ``max_tokens``; covers the whole corpus once, so ``num_chunks`` does not apply.

Self-study takes the chunks in the chunk set's order, so a run with fewer batches than chunks
still covers what the first chunks cover; :func:`coverage` says how much of the corpus that is.

Chunks are token spans of one document; their text is the exact slice of the document those
tokens cover (from the tokenizer's character offsets), never a lossy decode. The tokenizer is
passed in as an ``encode`` function, so this module knows no model.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cartridges.checks import Problems

# text -> one (char_start, char_end) per token, no special tokens
Encode = Callable[[str], Sequence[tuple[int, int]]]

METHODS = ("token_windows", "structural")


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    token_start: int
    token_end: int


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ChunkingConfig:
    """The ``document_prep.chunking`` parameters.

    Args:
        method: ``token_windows`` or ``structural``.
        num_chunks: windows to draw (``token_windows`` only).
        min_tokens: shortest window; ``structural`` starts a new chunk at a heading only once
            the current one has this many tokens.
        max_tokens: longest chunk.
        seed: seed of the window sampler.
        description: a line put before every chunk's text (e.g. what the corpus is).
    """

    method: str = "token_windows"
    num_chunks: int = 16
    min_tokens: int = 512
    max_tokens: int = 1024
    seed: int = 0
    description: str | None = ""

    def __post_init__(self) -> None:
        problems = Problems()
        problems.require(
            self.method in METHODS,
            f"chunking.method must be one of {METHODS}, got {self.method!r}.",
        )
        problems.require(
            0 < self.min_tokens <= self.max_tokens,
            f"Need 0 < min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}.",
        )
        problems.require(
            self.num_chunks >= 1, f"num_chunks must be at least 1, got {self.num_chunks}."
        )
        problems.raise_any()


def random_windows(
    documents: Sequence[tuple[str, int]],
    num_chunks: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
) -> list[Chunk]:
    """Token windows of ``min_tokens..max_tokens`` that tile the corpus, pass after pass.

    A pass cuts every document into consecutive windows of random lengths, the first starting at
    its first token and the last ending at its last, so every token is in a window of every pass
    and a document gets windows in proportion to its length (as with the paper's sampler, whose
    uniformly placed windows rarely reach a document's ends). Passes differ in their lengths, so
    in where windows start. A pass's windows are shuffled, and the chunk set takes ``num_chunks``
    windows pass after pass: any prefix of one pass's length covers the whole corpus. A document
    shorter than a drawn length is taken whole. The same inputs and seed give the same chunks.

    Args:
        documents: ``(doc_id, n_tokens)`` pairs.
        num_chunks: how many windows to draw.
        min_tokens: shortest window.
        max_tokens: longest window.
        seed: random seed.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"Need 0 < min_tokens <= max_tokens, got {min_tokens} and {max_tokens}.")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
    documents = [(doc_id, n) for doc_id, n in documents if n > 0]
    if not documents:
        raise ValueError("No document has any token to chunk.")
    rng = random.Random(seed)
    spans: list[tuple[str, int, int]] = []
    while len(spans) < num_chunks:
        one_pass = [
            (doc_id, start, end)
            for doc_id, n_tokens in documents
            for start, end in _tiling(n_tokens, min_tokens, max_tokens, rng)
        ]
        rng.shuffle(one_pass)
        spans.extend(one_pass)
    return [
        Chunk(f"chunk-{index:06d}", doc_id, start, end)
        for index, (doc_id, start, end) in enumerate(spans[:num_chunks])
    ]


def _tiling(
    n_tokens: int, min_tokens: int, max_tokens: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Consecutive windows over ``[0, n_tokens)``; the last ends at the end (it may overlap)."""
    windows, start = [], 0
    while True:
        remaining = n_tokens - start
        if remaining <= max_tokens:
            length = min(n_tokens, rng.randint(max(min_tokens, remaining), max_tokens))
            windows.append((n_tokens - length, n_tokens))
            return windows
        length = rng.randint(min_tokens, max_tokens)
        windows.append((start, start + length))
        start += length


@dataclass(frozen=True)
class Coverage:
    """How much of a corpus some chunks cover: the share of tokens in at least one chunk."""

    covered_tokens: int
    total_tokens: int
    uncovered: list[tuple[str, int, int]]  # (doc_id, token_start, token_end), in corpus order

    @property
    def fraction(self) -> float:
        return self.covered_tokens / self.total_tokens if self.total_tokens else 1.0

    def describe_uncovered(self, limit: int = 8) -> str:
        """The uncovered ranges for a log line, the first ``limit`` of them."""
        shown = [f"{doc} tokens {start}-{end}" for doc, start, end in self.uncovered[:limit]]
        more = len(self.uncovered) - limit
        return ", ".join(shown) + (f" and {more} more ranges" if more > 0 else "")


def coverage(
    documents: Iterable[tuple[str, int]], spans: Iterable[tuple[str, int, int]]
) -> Coverage:
    """Which tokens of ``documents`` (``(doc_id, n_tokens)``) the ``spans`` cover.

    ``spans`` are ``(doc_id, token_start, token_end)``; memory grows with the number of spans,
    not of tokens (intervals are merged per document).
    """
    by_doc: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for doc_id, start, end in spans:
        by_doc[doc_id].append((int(start), int(end)))
    covered = total = 0
    uncovered: list[tuple[str, int, int]] = []
    for doc_id, n_tokens in documents:
        total += n_tokens
        reached = 0  # tokens before this are covered or reported
        for start, end in sorted(by_doc.get(doc_id, ())):
            start, end = max(start, reached), min(end, n_tokens)
            if start > reached:
                uncovered.append((doc_id, reached, start))
            if end > start:
                covered += end - start
            reached = max(reached, end)
        if reached < n_tokens:
            uncovered.append((doc_id, reached, n_tokens))
    return Coverage(covered, total, uncovered)


# A block starts after a blank line, or at a Markdown / LaTeX heading.
_BLOCK_START = re.compile(
    r"\n[ \t]*\n(?=\S)|\n(?=#{1,6} |\\(?:part|chapter|section|subsection|subsubsection)\*?\{)"
)
_HEADING = re.compile(r"#{1,6} |\\(?:part|chapter|section|subsection|subsubsection)\*?\{")


def _token_at(starts: np.ndarray, offsets: Sequence[tuple[int, int]], char: int) -> int:
    """The token covering ``char`` (its leading whitespace comes along), else the next one."""
    token = int(np.searchsorted(starts, char, side="right")) - 1
    return token + 1 if token < 0 or offsets[token][1] <= char else token


def structural_chunks(
    doc_id: str,
    text: str,
    offsets: Sequence[tuple[int, int]],
    min_tokens: int,
    max_tokens: int,
) -> list[Chunk]:
    """Paragraphs and sections of one document, merged in order up to ``max_tokens`` tokens.

    A heading closes the current chunk once it holds ``min_tokens``, so sections stay whole
    where they fit; a single block longer than ``max_tokens`` is cut into windows.

    Args:
        doc_id: id of the document.
        text: its text.
        offsets: ``(char_start, char_end)`` of each of its tokens.
        min_tokens: see above.
        max_tokens: longest chunk.
    """
    n = len(offsets)
    starts = np.asarray(offsets).reshape(-1, 2)[:, 0]
    cuts, headings = [0], {0: bool(_HEADING.match(text))}
    for match in _BLOCK_START.finditer(text):
        token = _token_at(starts, offsets, match.end())
        if cuts[-1] < token < n:
            cuts.append(token)
            headings[token] = bool(_HEADING.match(text, match.end()))
    cuts.append(n)

    spans, start = [], 0
    for block_start, block_end in zip(cuts, cuts[1:], strict=False):
        current = block_start - start
        if current > 0 and (
            block_end - start > max_tokens or (headings[block_start] and current >= min_tokens)
        ):
            spans.append((start, block_start))
            start = block_start
        while block_end - start > max_tokens:
            spans.append((start, start + max_tokens))
            start += max_tokens
    if start < n:
        spans.append((start, n))
    return [Chunk(f"{doc_id}-{k:04d}", doc_id, s, e) for k, (s, e) in enumerate(spans)]


def chunk_corpus(
    doc_ids: Sequence[str],
    n_tokens: Sequence[int],
    texts: Iterable[str],
    encode: Encode,
    config: ChunkingConfig,
) -> list[dict[str, Any]]:
    """Chunk a corpus with the configured method; one row per chunk, in a deterministic order.

    Args:
        doc_ids: document ids, in corpus order.
        n_tokens: their token counts; they must be what ``encode`` gives (they weigh the window
            sampler, so that only the documents drawn are tokenised).
        texts: the documents' texts in the same order, read once, one at a time.
        encode: the model tokenizer's character offsets of a text.
        config: chunking parameters.

    Returns:
        rows of chunk_id, doc_id, token_start, token_end, n_tokens, text.
    """
    windows = config.method == "token_windows"
    chunks = []
    if windows:
        sizes = list(zip(doc_ids, n_tokens, strict=True))
        chunks = random_windows(
            sizes, config.num_chunks, config.min_tokens, config.max_tokens, config.seed
        )
    by_doc: dict[str, list[Chunk]] = defaultdict(list)
    for chunk in chunks:
        by_doc[chunk.doc_id].append(chunk)
    chunk_texts: dict[str, str] = {}
    for doc_id, expected, text in zip(doc_ids, n_tokens, texts, strict=True):
        if windows and doc_id not in by_doc:
            continue  # never drawn: no need to tokenise it
        offsets = _checked_offsets(doc_id, text, expected, encode)
        if not windows:
            by_doc[doc_id] = structural_chunks(
                doc_id, text, offsets, config.min_tokens, config.max_tokens
            )
            chunks.extend(by_doc[doc_id])
        for chunk in sorted(by_doc[doc_id], key=lambda c: c.token_start):  # spans in order
            chunk_texts[chunk.chunk_id] = text[
                offsets[chunk.token_start][0] : offsets[chunk.token_end - 1][1]
            ]
    prefix = f"{config.description.strip()}\n\n" if config.description else ""
    return [
        {
            **vars(chunk),
            "n_tokens": chunk.token_end - chunk.token_start,
            "text": prefix + chunk_texts[chunk.chunk_id],
        }
        for chunk in chunks
    ]


def _checked_offsets(
    doc_id: str, text: str, expected: int, encode: Encode
) -> Sequence[tuple[int, int]]:
    """The document's token offsets, refused when their count is not the corpus table's."""
    offsets = encode(text)
    if len(offsets) != expected:
        raise ValueError(
            f"Document {doc_id} has {len(offsets)} tokens under this tokenizer but "
            f"n_tokens={expected} in the corpus table: was it built with another model?"
        )
    return offsets
