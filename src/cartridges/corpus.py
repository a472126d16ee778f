"""Read a folder of documents into clean text; every input is kept or skipped with a reason."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".tex")


class CorpusError(ValueError):
    """No usable document, or a bad input under the strict policy."""


@dataclass
class Document:
    doc_id: str
    source: str
    title: str
    text: str
    sha256: str


@dataclass
class Skipped:
    source: str
    reason: str


def normalise_text(text: str) -> str:
    """NFC Unicode, Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _decode(raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if b"\x00" in raw:
        raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary content (NUL bytes)")
    return raw.decode("utf-8-sig")


def _title(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:120]
    return path.stem


def discover(root: Path, include: list[str], exclude: list[str]) -> list[Path]:
    """Files under ``root`` matching an include glob and no exclude glob, in a stable order."""
    if not root.exists():
        raise CorpusError(f"Corpus directory '{root}' does not exist.")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if path.name.startswith("."):
            continue
        if any(fnmatch.fnmatch(relative, g) for g in include) and not any(
            fnmatch.fnmatch(relative, g) for g in exclude
        ):
            files.append(path)
    return files


def read_document(path: Path, root: Path) -> Document | Skipped:
    """Load one file, or say why it cannot be used."""
    source = path.relative_to(root).as_posix()
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return Skipped(source, f"unsupported extension '{path.suffix}'")
    try:
        raw = path.read_bytes()
    except OSError as error:
        return Skipped(source, f"unreadable: {error.strerror or error}")
    try:
        text = normalise_text(_decode(raw))
    except UnicodeDecodeError as error:
        return Skipped(source, f"not valid UTF-8/UTF-16 text: {error.reason}")
    if not text:
        return Skipped(source, "empty after cleaning")
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    return Document(sha256[:16], source, _title(path, text), text, sha256)


def load_corpus(
    root: str | Path, include: list[str], exclude: list[str], strict: bool = False
) -> tuple[list[Document], list[Skipped]]:
    """Read every matching file under ``root``; skip bad ones with a warning (or fail if strict)."""
    root = Path(root)
    documents, skipped = [], []
    for path in discover(root, include, exclude):
        result = read_document(path, root)
        if isinstance(result, Skipped):
            if strict:
                raise CorpusError(f"Cannot use '{result.source}': {result.reason} (strict mode).")
            logger.warning("Skipping '%s': %s", result.source, result.reason)
            skipped.append(result)
        else:
            documents.append(result)
    if not documents:
        raise CorpusError(
            f"No usable document under '{root}' (include={include}, exclude={exclude}); "
            f"skipped {len(skipped)}: " + "; ".join(f"{s.source}: {s.reason}" for s in skipped[:5])
        )
    return documents, skipped


def join_documents(texts: list[str]) -> str:
    """The whole corpus as one text, documents separated by a blank line (for ICL and init)."""
    return "\n\n".join(texts)
