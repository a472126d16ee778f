"""Gather documents from a folder, explicit paths and URLs; every input is kept or skipped.

Inputs are read one at a time and only their clean text is kept, so memory follows the size of
the corpus table, not of the raw files (PDFs and HTML are often ten times their text). Formats
and cleaning live in ``cartridges.documents``; this module owns discovery, ids, duplicates and
the skip policy. Token counting is passed in as a function: the library does not know models.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ConfigDict, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cartridges.documents import SUFFIXES, Unusable, fetch_url, normalise_text, parse_document
from cartridges.documents.loaders import DEFAULT_JSON_TEXT_FIELDS
from cartridges.storage import Location, Store

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusConfig",
    "CorpusError",
    "Document",
    "Skipped",
    "corpus_statistics",
    "discover",
    "load_corpus",
    "normalise_text",
]


class CorpusError(ValueError):
    """No usable document, or a bad input under the strict policy."""


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class CorpusConfig:
    """Where documents come from and what to do with bad ones (``document_prep`` parameters).

    Args:
        corpus_dir: walked recursively: a local folder or an fsspec URL (``s3://bucket/corpus``,
            its client's credentials from the environment); ``None`` to use only ``paths`` and
            ``urls``.
        include: globs on the path relative to ``corpus_dir`` (``fnmatch``: ``*`` crosses ``/``).
        exclude: globs that remove files ``include`` matched (default: hidden files).
        paths: extra files (or folders, walked with the same globs), outside ``corpus_dir``.
        urls: http(s) documents to download.
        strict: turn every skipped input into an error.
        max_file_mb: larger files and downloads are skipped unread.
        url_timeout_s: limit for one download, connection included.
        json_text_fields: JSON/JSONL record fields holding the text, in order; records with none
            of them are rendered as ``key: value`` lines.
    """

    corpus_dir: str | None = "data/01_raw/corpus"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: [".*", "*/.*"])
    paths: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    strict: bool = False
    max_file_mb: float = 64.0
    url_timeout_s: float = 10.0
    json_text_fields: list[str] = field(default_factory=lambda: list(DEFAULT_JSON_TEXT_FIELDS))

    @field_validator("include", "exclude", "paths", "urls", "json_text_fields", mode="before")
    @classmethod
    def _string_list(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty YAML key (``None``) is an empty list; a lone string is a likely mistake."""
        if value is None:
            return []
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"`{info.field_name}` must be a list of strings, got {value!r}.")
        return value

    def __post_init__(self) -> None:
        if self.max_file_mb <= 0 or self.url_timeout_s <= 0:
            raise ValueError(
                f"`max_file_mb` and `url_timeout_s` must be > 0, "
                f"got {self.max_file_mb} and {self.url_timeout_s}."
            )

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


@dataclass
class Document:
    doc_id: str  # first 16 hex digits of the text's sha256: stable across runs and machines
    source: str  # path relative to corpus_dir, a path as given in `paths`, or a URL
    format: str
    title: str
    text: str
    sha256: str
    n_chars: int
    n_tokens: int | None = None
    encoding: str = ""  # what its bytes were decoded as (utf-8, windows-1252, ...); "" for PDF


def document_name(source: str) -> str:
    """How questions and per-document cartridges name a document: its file name without the
    extension (``manuals/pump.pdf`` -> ``pump``; a URL's last path segment)."""
    return PurePosixPath(source.split("?")[0].rstrip("/")).stem or source


@dataclass
class Skipped:
    source: str
    reason: str


# ---------------------------------------------------------------------------- discovery


def discover(
    root: Path, include: Sequence[str], exclude: Sequence[str]
) -> tuple[list[Path], list[Skipped]]:
    """Files under ``root`` matching an include glob and no exclude glob, in a stable order.

    Returns:
        the files, and a ``Skipped`` entry for each folder that could not be listed.
    """
    files, unreadable = [], []

    def _on_error(error: OSError) -> None:
        where = Path(error.filename).relative_to(root).as_posix() if error.filename else "."
        unreadable.append(Skipped(where, f"unreadable folder: {error.strerror or error}"))

    for folder, subfolders, names in os.walk(root, onerror=_on_error):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            if _included(path.relative_to(root).as_posix(), include, exclude):
                files.append(path)
    return files, unreadable


def _included(relative: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(relative, g) for g in include) and not any(
        fnmatch.fnmatch(relative, g) for g in exclude
    )


_Reader = Callable[[], tuple[bytes, str, str | None]]  # -> (raw bytes, format, declared charset)


def _format_of(suffix: str) -> str:
    """The document format of a file name's suffix, or :class:`Unusable` saying why not."""
    kind = SUFFIXES.get(suffix.lower())
    if kind is None:
        raise Unusable(f"unsupported extension '{suffix}'" if suffix else "no file extension")
    return kind


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise Unusable(f"too large: {size} bytes, limit {max_bytes}")


def _file_reader(path: Path, max_bytes: int) -> _Reader:
    def read() -> tuple[bytes | bytearray, str, str | None]:
        kind = _format_of(path.suffix)
        try:
            size = path.stat().st_size
            _check_size(size, max_bytes)
            return _read_into_bytearray(path, size), kind, None
        except OSError as error:
            raise Unusable(f"unreadable: {error.strerror or error}") from None

    return read


def _read_into_bytearray(path: Path, size: int) -> bytearray:
    """The file's bytes in a buffer the parser can release once it has the text."""
    data = bytearray(size)
    with path.open("rb") as handle, memoryview(data) as view:
        read = handle.readinto(view)
    del data[read:]
    return data


def _missing(reason: str) -> _Reader:
    def read() -> tuple[bytes, str, str | None]:
        raise Unusable(reason)

    return read


def _walk(root: Path, prefix: str, config: CorpusConfig) -> Iterator[tuple[str, _Reader]]:
    if not root.is_dir():
        what = "not a folder" if root.exists() else "missing: no such folder"
        yield prefix or root.as_posix(), _missing(what)
        return
    files, unreadable = discover(root, config.include, config.exclude)
    for skipped in unreadable:
        yield f"{prefix}{skipped.source}", _missing(skipped.reason)
    for path in files:
        yield f"{prefix}{path.relative_to(root).as_posix()}", _file_reader(path, config.max_bytes)


def _walk_store(root: Location, config: CorpusConfig) -> Iterator[tuple[str, _Reader]]:
    """A corpus folder on an object store: one listing (with sizes), each file fetched when its
    turn comes, in the order a local walk gives."""
    base = root.path.rstrip("/")
    listing = root.store.fs.find(base, detail=True) if root.store.exists(base) else {}
    if not listing:
        yield str(root), _missing("missing: no such folder")
        return
    relatives = sorted(
        ((PurePosixPath(key).relative_to(base).parts, key) for key in listing if key != base),
        key=lambda item: _walk_order(item[0]),
    )
    for parts, key in relatives:
        relative = "/".join(parts)
        if _included(relative, config.include, config.exclude):
            yield relative, _object_reader(root.store, key, listing[key]["size"], config.max_bytes)


def require_documents(
    names: Iterable[str], texts: Mapping[str, str], subject: str, where: str
) -> None:
    """Refuse document cartridges (``names``) whose document is not among ``texts``."""
    missing = [name for name in names if name not in texts]
    if missing:
        raise ValueError(
            f"{subject} {missing} have no document of that name in {where} ({sorted(texts)}): "
            "were they trained on another corpus?"
        )


def _walk_order(parts: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """The order of a local walk: a folder's files (by name) before its subfolders (by name)."""
    return tuple((1, part) for part in parts[:-1]) + ((0, parts[-1]),)


def _object_reader(store: Store, key: str, size: int, max_bytes: int) -> _Reader:
    def read() -> tuple[bytes, str, str | None]:
        kind = _format_of(PurePosixPath(key).suffix)
        _check_size(size, max_bytes)
        try:
            return store.read_bytes(key), kind, None
        except OSError as error:
            raise Unusable(f"unreadable: {error}") from None

    return read


def _inputs(config: CorpusConfig) -> Iterator[tuple[str, _Reader]]:
    """``(source, reader)`` for every input, readers called lazily: one file in memory at once."""
    if config.corpus_dir is not None:
        root = Location.of(config.corpus_dir)
        if root.store.is_local:
            yield from _walk(Path(root.path), "", config)
        else:
            yield from _walk_store(root, config)
    for given in config.paths:
        path = Path(given)
        if path.is_dir():
            yield from _walk(path, f"{path.as_posix().rstrip('/')}/", config)
        elif path.exists() or path.is_symlink():
            yield given, _file_reader(path, config.max_bytes)
        else:
            yield given, _missing("missing: no such file or folder")
    for url in config.urls:
        yield url, lambda url=url: fetch_url(url, config.url_timeout_s, config.max_bytes)


# ---------------------------------------------------------------------------- loading


def text_digest(text: str, piece_chars: int = 1 << 20) -> str:
    """The SHA-256 of ``text``'s UTF-8, encoded a piece at a time (no second copy of a large
    document in memory)."""
    digest = hashlib.sha256()
    for start in range(0, len(text), piece_chars):
        digest.update(text[start : start + piece_chars].encode())
    return digest.hexdigest()


def iter_corpus(
    config: CorpusConfig, count_tokens: Callable[[str], int] | None = None
) -> Iterator[Document | Skipped]:
    """Read the inputs one at a time, yielding each as a document or as a skip with its reason.

    Only one input's raw bytes are held at a time, so a caller that stores the texts compactly
    keeps memory near the size of the clean text. A document whose text equals an earlier
    one's is skipped as a duplicate: it would get the same id and be sampled twice as often.

    Raises:
        CorpusError: any skip under ``config.strict``, or no usable document at the end.
    """
    seen: dict[str, str] = {}
    skipped: list[Skipped] = []
    for source, read in _inputs(config):
        try:
            raw, kind, charset = read()
            title, text, encoding = parse_document(
                raw,
                kind,
                declared_encoding=charset,
                json_text_fields=config.json_text_fields,
                source=source,
            )
            del raw
            digest = text_digest(text)
            if digest in seen:
                raise Unusable(f"duplicate of '{seen[digest]}' (same text)")
        except Unusable as error:
            if config.strict:
                raise CorpusError(f"Cannot use '{source}': {error} (strict: true).") from None
            logger.warning("Skipping '%s': %s", source, error)
            skipped.append(Skipped(source, str(error)))
            yield skipped[-1]
            continue
        seen[digest] = source
        n_tokens = count_tokens(text) if count_tokens else None
        yield Document(
            digest[:16], source, kind, title, text, digest, len(text), n_tokens, encoding
        )
    if not seen:
        raise CorpusError(
            f"No usable document (corpus_dir={config.corpus_dir!r}, include={config.include}, "
            f"exclude={config.exclude}, {len(config.paths)} paths, {len(config.urls)} urls); "
            f"skipped {len(skipped)}" + "".join(f"\n  {s.source}: {s.reason}" for s in skipped[:10])
        )
    logger.info("Loaded %d documents, skipped %d inputs", len(seen), len(skipped))


def load_corpus(
    config: CorpusConfig, count_tokens: Callable[[str], int] | None = None
) -> tuple[list[Document], list[Skipped]]:
    """Read every input; skip bad ones with a warning (or fail if ``config.strict``).

    Args:
        config: sources and policy.
        count_tokens: tokens of one text under the model's tokenizer; ``n_tokens`` stays
            ``None`` without it.

    Returns:
        the documents in input order, and the skipped inputs with their reasons.

    Raises:
        CorpusError: nothing usable remains, or any skip under ``strict``.
    """
    documents, skipped = [], []
    for item in iter_corpus(config, count_tokens):
        (documents if isinstance(item, Document) else skipped).append(item)
    return documents, skipped


# ---------------------------------------------------------------------------- statistics


def _distribution(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    quantile = lambda q: float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])  # noqa: E731
    return {
        "min": float(ordered[0]),
        "p10": quantile(0.1),
        "p50": quantile(0.5),
        "p90": quantile(0.9),
        "max": float(ordered[-1]),
        "mean": statistics.fmean(ordered),
    }


def corpus_statistics(
    doc_tokens: Sequence[int],
    doc_chars: Sequence[int],
    formats: Sequence[str],
    chunk_tokens: Sequence[int],
    num_skipped: int,
) -> dict[str, Any]:
    """Counts and token-length distributions of documents and chunks, for the report and MLflow."""
    return {
        "num_documents": len(doc_tokens),
        "num_skipped": num_skipped,
        "num_chunks": len(chunk_tokens),
        "total_tokens": int(sum(doc_tokens)),
        "total_chars": int(sum(doc_chars)),
        "chunk_tokens_total": int(sum(chunk_tokens)),
        "documents_by_format": dict(sorted(Counter(formats).items())),
        "document_tokens": _distribution(doc_tokens),
        "chunk_tokens": _distribution(chunk_tokens),
    }
