"""Bytes of one input -> ``(title, clean text)``, per format; or ``Unusable`` with the reason.

Text goes to an LLM, so cleaning keeps what a reader would see and drops what only a renderer
or a compiler needs: LaTeX comments, HTML scripts/styles/navigation, invisible Unicode. Markup
that carries structure (Markdown headings, LaTeX sections) is kept for the structural chunker;
HTML headings are rewritten as Markdown headings for the same reason.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

# suffix -> format name; the format picks the parser.
SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".tex": "latex",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}

DEFAULT_JSON_TEXT_FIELDS = ("text", "content", "body")

# The input being parsed, for the warning of a fallback decoding deep inside a format's parser.
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("source", default="")
# The character encoding the input's text was decoded as, for the corpus table.
_DECODED_AS: contextvars.ContextVar[str] = contextvars.ContextVar("decoded_as", default="")


class Parsed(NamedTuple):
    title: str
    text: str
    encoding: str  # what the bytes were decoded as ("utf-8", "windows-1252", ...); "" for PDF


class Unusable(Exception):
    """An input that cannot become a document; ``str(error)`` is the reason that gets recorded."""


# ---------------------------------------------------------------------------- text cleaning

_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u2060\ufeff"), None)  # soft hyphen, ZW space
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\f\v]")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_FRACTION = 0.01  # above this, "text" is really a binary file


def decode_text(raw: bytes, declared: str | None = None) -> str:
    """Decode bytes as UTF-8/16/32 (by BOM), a declared charset, UTF-8, then Windows-1252/Latin-1.

    Latin-1 decodes any byte string, so binary content is recognised by its control characters
    instead of by a decoding error.
    """
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            _DECODED_AS.set(encoding.removesuffix("-sig"))
            return _check_text(raw.decode(encoding, errors="replace"))
    if b"\x00" in raw:
        raise Unusable("binary file (NUL bytes; UTF-16/32 text needs a byte-order mark)")
    for encoding in (declared, "utf-8", "cp1252", "latin-1"):
        if encoding is None:
            continue
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
        name = {"cp1252": "windows-1252"}.get(encoding, encoding)
        _DECODED_AS.set(name)
        if encoding not in ("utf-8", declared):
            logger.warning(
                "%s is not valid UTF-8 and declares no charset: decoded as %s, so a few "
                "characters may differ from the author's (recorded in the corpus table's encoding "
                "column). Save it as UTF-8 to be sure.",
                _SOURCE.get() or "An input",
                "Windows-1252" if encoding == "cp1252" else "Latin-1",
            )
        return _check_text(text)
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _check_text(text: str) -> str:
    controls = len(_CONTROLS.findall(text[:65536]))
    if controls > _MAX_CONTROL_FRACTION * min(len(text), 65536):
        raise Unusable(f"binary or undecodable file ({controls} control characters in text)")
    return text


def normalise_text(text: str) -> str:
    """NFC Unicode, Unix newlines, plain spaces, no invisible characters, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n\n").translate(_INVISIBLE)
    text = _CONTROLS.sub("", _SPACES.sub(" ", text))
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _collapse_spaces(text: str) -> str:
    """Layout whitespace from HTML and PDF: runs of spaces inside a line mean nothing."""
    return re.sub(r"[ \t]*\n[ \t]*", "\n", re.sub(r"[ \t]{2,}", " ", text))


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:120]
    return ""


# ---------------------------------------------------------------------------- formats


def _parse_text(raw: bytes, declared_encoding: str | None = None, **_: Any) -> tuple[str, str]:
    return "", decode_text(raw, declared_encoding)


_TEX_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)%.*$")  # % not escaped as \%
_TEX_COMMENT_ENV = re.compile(r"\\begin\{comment\}.*?\\end\{comment\}", re.S)
_TEX_TITLE = re.compile(r"\\title\{([^{}]*)\}")


def _parse_latex(raw: bytes, declared_encoding: str | None = None, **_: Any) -> tuple[str, str]:
    # A line that is only a comment disappears entirely: left blank it would start a paragraph.
    lines = [
        _TEX_COMMENT.sub(r"\1", line)
        for line in decode_text(raw, declared_encoding).splitlines()
        if not line.lstrip().startswith("%")
    ]
    text = _TEX_COMMENT_ENV.sub("", "\n".join(lines))
    title = _TEX_TITLE.search(text)
    return (title.group(1).strip() if title else ""), text


def _json_record_text(record: Any, fields: Sequence[str]) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        chosen = [record[f] for f in fields if isinstance(record.get(f), str | list)]
        if chosen:
            return "\n\n".join(v if isinstance(v, str) else "\n".join(map(str, v)) for v in chosen)
    # No text field: every scalar as "key: value", so exported records stay readable.
    return "\n".join(f"{key}: {value}" for key, value in _scalars(record, ""))


def _scalars(value: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return [] if value is None else [(prefix or "value", value)]
    return [s for k, v in items for s in _scalars(v, f"{prefix}.{k}" if prefix else str(k))]


def _records_document(records: list[Any], fields: Sequence[str]) -> tuple[str, str]:
    first = records[0] if records else None
    title = first.get("title") if isinstance(first, dict) else None
    text = "\n\n".join(_json_record_text(r, fields) for r in records)
    return (title if isinstance(title, str) else ""), text


def _parse_json(
    raw: bytes, json_text_fields: Sequence[str] = DEFAULT_JSON_TEXT_FIELDS, **_: Any
) -> tuple[str, str]:
    try:
        data = json.loads(decode_text(raw))
    except json.JSONDecodeError as error:
        raise Unusable(
            f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    return _records_document(data if isinstance(data, list) else [data], json_text_fields)


def _parse_jsonl(
    raw: bytes, json_text_fields: Sequence[str] = DEFAULT_JSON_TEXT_FIELDS, **_: Any
) -> tuple[str, str]:
    records = []
    for number, line in enumerate(decode_text(raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise Unusable(
                f"malformed JSONL at line {number}, column {error.colno}: {error.msg}"
            ) from None
    return _records_document(records, json_text_fields)


# Not content: never rendered, or page furniture around it.
_HTML_SKIP = {
    "head", "title", "script", "style", "noscript", "template", "nav", "svg", "iframe", "form",
    "button", "select",
}  # fmt: skip
_HTML_CHROME = {"header", "footer", "aside"}  # skipped outside <article>/<main> only
_HTML_BLOCKS = {
    "p", "div", "section", "article", "main", "li", "tr", "table", "ul", "ol", "dl", "dt", "dd",
    "blockquote", "figure", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "header", "footer",
}  # fmt: skip
_HTML_WHITESPACE = re.compile(r"\s+")


def _parse_html(raw: bytes, declared_encoding: str | None = None, **_: Any) -> tuple[str, str]:
    from bs4 import BeautifulSoup
    from bs4.dammit import EncodingDetector

    declared = declared_encoding or EncodingDetector.find_declared_encoding(raw, is_html=True)
    soup = BeautifulSoup(decode_text(raw, declared), "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    return title, _html_text(soup)


def _html_text(soup: Any) -> str:
    """Visible text in reading order; blocks become paragraphs, headings Markdown headings.

    A walk over the tree rather than edits to it: bs4 inserts are linear in the number of
    siblings, which makes marking up a long flat page quadratic.
    """
    from bs4.element import CData, NavigableString, PreformattedString, Tag

    flowing: list[str] = []  # HTML whitespace is layout: collapsed, except inside <pre>
    pieces: list[str] = []
    stack: list[tuple[Any, bool]] = [(soup, False)]  # (node or closing marker, inside content)
    while stack:
        node, in_content = stack.pop()
        if type(node) is str:  # a closing marker pushed below
            flowing.append(node)
        elif isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString) or isinstance(node, CData):
                flowing.append(_HTML_WHITESPACE.sub(" ", node))  # comments, doctype: skipped
        elif isinstance(node, Tag):
            name = node.name
            if (
                name in _HTML_SKIP
                or node.get("role") == "navigation"
                or (name in _HTML_CHROME and not in_content)
            ):
                continue
            if name == "br":
                flowing.append("\n")
            elif name == "pre":
                pieces += [_collapse_spaces("".join(flowing)), f"\n\n{node.get_text()}\n\n"]
                flowing = []
            else:
                inside = in_content or name in ("article", "main")
                if name in _HTML_BLOCKS:
                    flowing.append("\n\n")
                    stack.append(("\n\n", inside))
                if name[0] == "h" and name[1:].isdigit():
                    flowing.append("#" * int(name[1:]) + " ")
                elif name == "li":
                    flowing.append("- ")
                stack.extend((child, inside) for child in reversed(node.contents))
    pieces.append(_collapse_spaces("".join(flowing)))
    return "".join(pieces)


def _parse_pdf(raw: bytes, **_: Any) -> tuple[str, str]:
    from pypdf import PdfReader

    # pypdf raises many exception types on damaged files; any of them means "cannot read it".
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unusable("encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except Unusable:
        raise
    except Exception as error:  # noqa: BLE001
        raise Unusable(f"unreadable PDF: {type(error).__name__}: {error}") from None
    if not any(page.strip() for page in pages):
        raise Unusable(
            f"PDF has no extractable text ({len(pages)} page(s); scanned pages need OCR first)"
        )
    return str(title), _collapse_spaces("\n\n".join(pages))


_PARSERS: dict[str, Callable[..., tuple[str, str]]] = {
    "text": _parse_text,
    "markdown": _parse_text,
    "latex": _parse_latex,
    "json": _parse_json,
    "jsonl": _parse_jsonl,
    "html": _parse_html,
    "pdf": _parse_pdf,
}


# Formats whose parsers read a bytearray as they read bytes (HTML and PDF parsers want bytes).
_PARSES_BUFFERS = frozenset({"text", "markdown", "latex", "json", "jsonl"})


def parse_document(
    raw: bytes | bytearray,
    kind: str,
    *,
    declared_encoding: str | None = None,
    json_text_fields: Sequence[str] = DEFAULT_JSON_TEXT_FIELDS,
    source: str = "",
) -> Parsed:
    """Parse and clean one input.

    Args:
        raw: the file's bytes; a ``bytearray`` is cleared once parsed, so that its memory is
            free while the text is cleaned (a large file's bytes are not held beside two
            copies of its text).
        kind: a format from ``SUFFIXES`` (``"text"``, ``"markdown"``, ``"pdf"``, ...).
        declared_encoding: a charset the source declared (an HTTP header), tried before UTF-8.
        json_text_fields: JSON/JSONL record fields that hold the text, in order.
        source: the input's name, for warnings (e.g. a fallback decoding).

    Returns:
        ``(title, text, encoding)``; the title is the format's own (HTML ``<title>``, PDF
        metadata, ``\\title{}``, a JSON ``title``) or else the first line of the text; the
        encoding is what the bytes were decoded as (``""`` for a PDF's text layer).

    Raises:
        Unusable: with the reason, for empty, binary, malformed or text-less input.
    """
    if not raw:
        raise Unusable("empty file")
    if isinstance(raw, bytearray) and kind not in _PARSES_BUFFERS:
        data = bytes(raw)
        raw.clear()
        raw = data
    token, decoded = _SOURCE.set(source), _DECODED_AS.set("")
    try:
        title, text = _PARSERS[kind](
            raw, declared_encoding=declared_encoding, json_text_fields=json_text_fields
        )
        encoding = _DECODED_AS.get()
    finally:
        _SOURCE.reset(token)
        _DECODED_AS.reset(decoded)
        if isinstance(raw, bytearray):
            raw.clear()
    text = normalise_text(text)
    if not text:
        raise Unusable("empty after cleaning")
    return Parsed(normalise_text(title)[:200] or _first_line(text), text, encoding)
