"""The corpus and chunk-set tables: documents and chunks as DataFrames, tokens counted.

``cartridges.corpus`` yields documents one at a time and ``cartridges.chunking`` cuts token
spans; both know no model and no table. This module puts them in the tables the pipeline stores
(``CORPUS_COLUMNS``, ``CHUNK_COLUMNS``), counting and offsetting tokens with the model's fast
tokenizer, and keeps a large corpus's texts in compact Arrow buffers while it reads.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from cartridges.chunking import ChunkingConfig, Coverage, Encode, chunk_corpus, coverage
from cartridges.corpus import (
    CorpusConfig,
    Document,
    corpus_statistics,
    document_name,
    iter_corpus,
)

logger = logging.getLogger(__name__)

CORPUS_COLUMNS = [
    "doc_id", "source", "format", "title", "text", "sha256", "n_chars", "n_tokens", "encoding"
]  # fmt: skip
CHUNK_COLUMNS = ["chunk_id", "doc_id", "token_start", "token_end", "n_tokens", "text"]
SKIPPED_COLUMNS = ["source", "reason"]


class _Offsets(Sequence[tuple[int, int]]):
    """Character span of each token, read from the Rust encoding only where it is asked for.

    Token windows need two spans per chunk; building the whole offsets list in Python would
    cost as much as tokenising again.
    """

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding

    def __len__(self) -> int:
        return len(self._encoding)

    def __getitem__(self, index: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= index < len(self._encoding):
            raise IndexError(index)
        return self._encoding.token_to_chars(index)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._encoding.offsets)


class _PiecedOffsets(Sequence[tuple[int, int]]):
    """Character spans of a long text's tokens, encoded one piece at a time when asked for.

    Only the piece holding the token asked for is encoded (the last one is kept), so reading
    spans in text order encodes each piece at most once and holds one piece's encoding.
    """

    def __init__(
        self, text: str, cuts: list[int], counts: list[int], encode: Callable[[str], Any]
    ) -> None:
        self._text, self._cuts, self._encode = text, cuts, encode
        self._bases = np.cumsum([0, *counts])
        self._held: tuple[int, Any] = (-1, None)

    def __len__(self) -> int:
        return int(self._bases[-1])

    def _piece(self, k: int) -> Any:
        if self._held[0] != k:
            self._held = (k, self._encode(self._text[self._cuts[k] : self._cuts[k + 1]]))
        return self._held[1]

    def __getitem__(self, index: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._bases, index, side="right")) - 1
        start, end = self._piece(k).token_to_chars(int(index - self._bases[k]))
        return start + self._cuts[k], end + self._cuts[k]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, base in enumerate(self._cuts[:-1]):
            for start, end in self._piece(k).offsets:
                yield start + base, end + base

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        pieces = [
            np.array(self._piece(k).offsets, dtype=np.int64).reshape(-1, 2) + base
            for k, base in enumerate(self._cuts[:-1])
        ]
        return np.concatenate(pieces).astype(dtype or np.int64, copy=False)


# A text longer than this is tokenised in pieces: a fast tokenizer's encoding costs hundreds
# of bytes per token, so one 50 MB document encoded whole took gigabytes.
PIECE_CHARS = 1 << 18
_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")  # one space between two words: a candidate cut
_CUT_CHECK_CHARS = 256  # context either side of a cut in which its tokens are compared
_CUT_TRIES = 64


def piece_cuts(
    text: str, encode_ids: Callable[[str], list[int]], piece_chars: int = PIECE_CHARS
) -> list[int]:
    """Where ``text`` can be cut so that tokenising the pieces gives the tokens of the whole.

    A cut is a single space between words about every ``piece_chars`` characters, kept only if
    the tokens around it are the same cut and whole (a tokenizer that marks word starts, or a
    merge across the space, moves it to the next candidate). Returns the piece boundaries,
    ``[0, ..., len(text)]``.
    """
    cuts, position = [0], piece_chars
    while position < len(text) - piece_chars // 4:
        for tries, match in enumerate(_WORD_GAP.finditer(text, position)):
            cut = match.start()
            left = text[max(cut - _CUT_CHECK_CHARS, cuts[-1]) : cut]
            right = text[cut : cut + _CUT_CHECK_CHARS]
            if encode_ids(left + right) == encode_ids(left) + encode_ids(right):
                cuts.append(cut)
                break
            if tries >= _CUT_TRIES:
                break
        position = max(cuts[-1], position) + piece_chars
    return [*cuts, len(text)]


def offsets_encoder(tokenizer: PreTrainedTokenizerBase) -> Encode:
    """Character offsets of a text's tokens, no special tokens, straight from the fast tokenizer.

    A long text is encoded piece by piece (:func:`piece_cuts`), its spans kept compactly.
    """
    if not tokenizer.is_fast:
        raise ValueError(
            f"Chunking needs a fast tokenizer (character offsets); {type(tokenizer).__name__} "
            "is not one."
        )
    backend = tokenizer.backend_tokenizer

    def encode(text: str) -> Sequence[tuple[int, int]]:
        if len(text) <= PIECE_CHARS:
            return _Offsets(backend.encode(text, add_special_tokens=False))
        cuts = piece_cuts(text, _ids_encoder(backend), PIECE_CHARS)
        counts = [
            len(backend.encode_batch_fast([text[start:end]], add_special_tokens=False)[0])
            for start, end in itertools.pairwise(cuts)
        ]
        return _PiecedOffsets(
            text, cuts, counts, lambda piece: backend.encode(piece, add_special_tokens=False)
        )

    return encode


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    """Tokens in a text, without special tokens (chunk spans count the same way).

    A long text is counted piece by piece (:func:`piece_cuts`), so memory stays flat.
    """
    if tokenizer.is_fast:  # without character offsets, counting is about 1.5x faster
        backend = tokenizer.backend_tokenizer
        ids = _ids_encoder(backend)

        def length(text: str) -> int:
            return len(backend.encode_batch_fast([text], add_special_tokens=False)[0])
    else:

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        def length(text: str) -> int:
            return len(ids(text))

    def count(text: str) -> int:
        if len(text) <= PIECE_CHARS:
            return length(text)
        cuts = piece_cuts(text, ids, PIECE_CHARS)
        return sum(length(text[start:end]) for start, end in itertools.pairwise(cuts))

    return count


def _ids_encoder(backend: Any) -> Callable[[str], list[int]]:
    """Token ids without special tokens or character offsets (the fastest encoding)."""
    return lambda text: backend.encode_batch_fast([text], add_special_tokens=False)[0].ids


class CorpusTable:
    """The corpus table, filled one document at a time with its texts kept in Arrow buffers.

    Keeping Python strings until the end costs them plus pandas' Arrow copy; moving them to
    Arrow every few megabytes frees each one early, so peak memory stays near the size of
    the table itself however large the corpus.
    """

    FLUSH_CHARS = 8_000_000

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in CORPUS_COLUMNS if name != "text"}
        self.text_chunks: list[pa.Array] = []
        self.pending: list[str] = []
        self.pending_chars = 0

    def add(self, document: Document) -> None:
        for name, values in self.columns.items():
            values.append(getattr(document, name))
        self.pending.append(document.text)
        self.pending_chars += len(document.text)
        if self.pending_chars >= self.FLUSH_CHARS:
            self._flush()

    def _flush(self) -> None:
        """Move the pending texts into one exactly sized Arrow array.

        ``pa.array`` grows its buffer by doubling and keeps the slack; building the UTF-8 data
        and offsets buffers directly allocates each byte once.
        """
        if self.pending:
            encoded = [text.encode() for text in self.pending]
            self.pending.clear()
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(data) for data in encoded], out=offsets[1:])
            data = b"".join(encoded)
            del encoded
            self.text_chunks.append(
                pa.LargeStringArray.from_buffers(
                    len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data)
                )
            )
        self.pending_chars = 0

    def frame(self) -> pd.DataFrame:
        self._flush()
        texts = pa.chunked_array(self.text_chunks, type=pa.large_string())
        columns = dict(
            self.columns,
            text=pd.Series(texts, dtype=pd.StringDtype("pyarrow", na_value=float("nan"))),
        )
        return pd.DataFrame(columns, columns=CORPUS_COLUMNS)


def corpus_table(
    config: CorpusConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every input of ``config`` as a document row (tokens counted) or a skipped row.

    Returns:
        The corpus (``CORPUS_COLUMNS``, one row per document) and the skipped inputs
        (``SKIPPED_COLUMNS``: source, reason), so that every input is accounted for.
    """
    table, skipped = CorpusTable(), []
    for item in iter_corpus(config, token_counter(tokenizer)):
        if isinstance(item, Document):
            table.add(item)
        else:
            skipped.append(vars(item))
    return table.frame(), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def chunk_table(
    corpus: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, config: ChunkingConfig
) -> pd.DataFrame:
    """The corpus cut by ``config.method``: ``CHUNK_COLUMNS``, one row per chunk."""
    rows = chunk_corpus(
        corpus["doc_id"].tolist(),
        corpus["n_tokens"].tolist(),
        one_at_a_time(corpus["text"]),
        offsets_encoder(tokenizer),
        config,
    )
    logger.info("Chunk set: %d chunks (%s)", len(rows), config.method)
    return pd.DataFrame(rows, columns=CHUNK_COLUMNS)


def document_names(corpus: pd.DataFrame) -> list[str]:
    """Each document's name (:func:`cartridges.corpus.document_name`), in corpus order.

    Raises:
        ValueError: two documents share a name, so a cartridge or question could not say which.
    """
    names = [document_name(source) for source in corpus["source"]]
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(
            f"Documents share a name {repeated}: rename the files to give each a cartridge."
        )
    return names


def texts_by_document(corpus: pd.DataFrame) -> dict[str, str]:
    """Each document's text by its name, in corpus order (see :func:`document_names`)."""
    return dict(zip(document_names(corpus), one_at_a_time(corpus["text"]), strict=True))


def one_at_a_time(texts: pd.Series) -> Iterator[str]:
    """The texts as Python strings, one alive at a time.

    Iterating an Arrow-backed column keeps a second copy of the current text alive beside the
    one handed out (50 MB more for a 50 MB document); reading by position does not.
    """
    for index in range(len(texts)):
        yield texts.iloc[index]


def chunk_coverage(corpus: pd.DataFrame, chunk_set: pd.DataFrame) -> Coverage:
    """Which tokens of the corpus's documents the chunks of ``chunk_set`` cover."""
    spans = zip(chunk_set["doc_id"], chunk_set["token_start"], chunk_set["token_end"], strict=True)
    return coverage(zip(corpus["doc_id"], corpus["n_tokens"], strict=True), spans)


def report_coverage(covered: Coverage, what: str, min_share: float = 1.0) -> float:
    """Log the share of corpus tokens ``what`` covers; warn, naming the gaps, below ``min_share``.

    A cartridge learns what its conversations are about: tokens no chunk holds are never in a
    teacher's context, so questions about them cannot be learned.
    """
    share = covered.fraction
    if share < min_share:
        logger.warning(
            "%s cover %.1f%% of the corpus's tokens (%d of %d), below the %.1f%% asked for; "
            "never in any chunk: %s. Draw more chunks (document_prep.chunking.num_chunks) or "
            "more batches (self_study.num_conversations / conversations_per_chunk).",
            what,
            100 * share,
            covered.covered_tokens,
            covered.total_tokens,
            100 * min_share,
            covered.describe_uncovered(),
        )
    else:
        logger.info(
            "%s cover %.1f%% of the corpus's tokens (%d of %d)",
            what,
            100 * share,
            covered.covered_tokens,
            covered.total_tokens,
        )
    return share


def summarise(
    corpus: pd.DataFrame, skipped: pd.DataFrame, chunk_set: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, float]]:
    """A report of the corpus and its chunks, and its numbers flat (``document_tokens.p50``)."""
    report = corpus_statistics(
        corpus["n_tokens"].tolist(),
        corpus["n_chars"].tolist(),
        corpus["format"].tolist(),
        chunk_set["n_tokens"].tolist(),
        len(skipped),
    )
    report["chunk_coverage"] = report_coverage(chunk_coverage(corpus, chunk_set), "The chunks")
    numbers = {}
    for name, value in report.items():
        if isinstance(value, dict) and name.endswith("tokens"):
            numbers |= {f"{name}.{stat}": float(v) for stat, v in value.items()}
        elif not isinstance(value, dict):
            numbers[name] = float(value)
    logger.info(
        "Corpus: %d documents, %d tokens, %d chunks, %d skipped",
        report["num_documents"],
        report["total_tokens"],
        report["num_chunks"],
        report["num_skipped"],
    )
    return report, numbers
