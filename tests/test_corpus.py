"""Loading documents: each format, each kind of bad input, discovery, ids and the skip policy."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pypdf import PdfWriter

from cartridges.context import join_documents
from cartridges.corpus import (
    CorpusConfig,
    CorpusError,
    corpus_statistics,
    load_corpus,
    text_digest,
)
from cartridges.documents import Unusable, decode_text, normalise_text, parse_document


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF whose pages show ``pages`` in Helvetica (one text line per line)."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    kids = b" ".join(b"%d 0 R" % p for p in page_ids)
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages)),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, text in zip(page_ids, pages, strict=True):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        lines = escaped.split("\n")
        ops = b"BT /F1 12 Tf 14 TL 72 720 Td " + b" ".join(
            b"(%s) Tj T*" % line.encode("latin-1") for line in lines if line
        ) + b" ET"  # fmt: skip
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(ops), ops)
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref, size = len(out), max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def blank_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def load_dir(root: Path, **kwargs) -> tuple[dict, dict]:
    """``({source: Document}, {source: reason})`` of a folder."""
    documents, skipped = load_corpus(CorpusConfig(corpus_dir=str(root), **kwargs))
    return {d.source: d for d in documents}, {s.source: s.reason for s in skipped}


def text_of(tmp_path: Path, name: str, content: bytes | str) -> str:
    """Write one file next to a control document and return its cleaned text."""
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    documents, skipped = load_dir(tmp_path)
    assert not skipped, skipped
    return documents[name].text


# ---------------------------------------------------------------------------- formats


def test_text_and_markdown(tmp_path):
    (tmp_path / "notes.txt").write_text("Seal life: 18 months.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "manual.md").write_text("\n# Pump Manual\n\nStart slowly.\n")
    documents, skipped = load_dir(tmp_path)
    assert skipped == {}
    assert list(documents) == ["notes.txt", "sub/manual.md"]  # sorted, relative, posix
    manual = documents["sub/manual.md"]
    assert (manual.title, manual.text, manual.format) == (
        "Pump Manual",
        "# Pump Manual\n\nStart slowly.",
        "markdown",
    )
    assert manual.sha256 == hashlib.sha256(manual.text.encode()).hexdigest()
    assert manual.doc_id == manual.sha256[:16] and manual.n_chars == len(manual.text)


def test_latex_comments_are_dropped(tmp_path):
    source = (
        "\\title{Seal Study}\n"
        "% a whole-line comment\n"
        "Leaks fell by 50\\% after the change. % why: new seal\n"
        "   % an indented comment line\n"
        "Line break\\\\% comment after an escaped backslash\n"
        "\\begin{comment}\nhidden draft\n\\end{comment}\n"
        "\\section{Results}\nDone.\n"
    )
    text = text_of(tmp_path, "paper.tex", source)
    assert text == (
        "\\title{Seal Study}\nLeaks fell by 50\\% after the change.\nLine break\\\\\n\n"
        "\\section{Results}\nDone."
    )
    assert "comment" not in text and "why" not in text and "hidden" not in text
    documents, _ = load_dir(tmp_path)
    assert documents["paper.tex"].title == "Seal Study"


def test_json_records(tmp_path):
    records = [
        {"title": "Pump FAQ", "text": "Alarm E21 is a seal leak.", "id": 1},
        {"content": ["Vent the casing.", "Ramp up over 90 s."]},
        "A bare string record.",
        {"model": "AP-40", "specs": {"flow_m3h": 40, "head_m": 32}},
    ]
    text = text_of(tmp_path, "faq.json", json.dumps(records))
    assert text == (
        "Alarm E21 is a seal leak.\n\nVent the casing.\nRamp up over 90 s.\n\n"
        "A bare string record.\n\nmodel: AP-40\nspecs.flow_m3h: 40\nspecs.head_m: 32"
    )
    documents, _ = load_dir(tmp_path)
    assert documents["faq.json"].title == "Pump FAQ"


def test_json_text_fields_are_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "ignored", "note": "kept"}\n')
    documents, _ = load_dir(tmp_path, json_text_fields=["note"])
    assert documents["a.jsonl"].text == "kept"


def test_jsonl(tmp_path):
    lines = [{"text": "First record."}, {"text": "Second record."}]
    content = "\n".join(json.dumps(r) for r in lines) + "\n\n"
    assert text_of(tmp_path, "log.jsonl", content) == "First record.\n\nSecond record."


def test_html_keeps_content_and_drops_scripts_styles_navigation(tmp_path):
    html = """<!DOCTYPE html><html><head><title>AP-40 &amp; friends</title>
    <style>body { color: red }</style><script>var tracking = 1;</script></head>
    <body>
      <header><a href="/">Home</a> | <a href="/shop">Shop</a></header>
      <nav><ul><li>Menu item</li></ul></nav>
      <div role="navigation">Breadcrumbs</div>
      <main><article>
        <h1>Pump   manual</h1>
        <p>The pump is
           <b>cast</b> stainless&nbsp;steel.</p>
        <ul><li>Open suction</li><li>Vent casing</li></ul>
        <pre>line 1
  line 2</pre>
        <!-- an HTML comment -->
        <script>alert("x")</script>
      </article></main>
      <footer>Copyright 2026</footer>
    </body></html>"""
    text = text_of(tmp_path, "page.html", html)
    assert text == (
        "# Pump manual\n\nThe pump is cast stainless steel.\n\n- Open suction\n\n- Vent casing"
        "\n\nline 1\n  line 2"
    )
    for dropped in ("tracking", "color", "Home", "Menu", "Breadcrumbs", "alert", "Copyright"):
        assert dropped not in text
    documents, _ = load_dir(tmp_path)
    assert documents["page.html"].title == "AP-40 & friends"
    assert documents["page.html"].format == "html"


def test_htm_with_declared_charset(tmp_path):
    html = '<html><head><meta charset="iso-8859-1"></head><body><p>Café crème</p></body></html>'
    assert text_of(tmp_path, "old.htm", html.encode("latin-1")) == "Café crème"


def test_pdf_text_is_extracted(tmp_path):
    pdf = make_pdf(["Aurora AP-40 manual\nReplace the seal every 18 months.", "Alarm E21: leak."])
    text = text_of(tmp_path, "manual.pdf", pdf)
    assert "Replace the seal every 18 months." in text
    assert text.index("18 months") < text.index("Alarm E21: leak.")
    assert "\n\n" in text  # pages are separate paragraphs


def test_text_is_normalised():
    raw = "Cafe\u0301 \u00a0menu\u200b\r\n\r\n\r\n\r\nsoft\u00adhyphen   \t\nend\u3000x\x07"
    assert normalise_text(raw) == "Café  menu\n\nsofthyphen\nend x"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Grüße, €5".encode("utf-16"), "Grüße, €5"),  # BOM + little endian
        (b"\xfe\xff" + "Grüße".encode("utf-16-be"), "Grüße"),
        (b"\xef\xbb\xbf" + "naïve".encode(), "naïve"),
        ("Café crème brûlée".encode("latin-1"), "Café crème brûlée"),
        ("“quoted” – dash".encode("cp1252"), "“quoted” – dash"),
    ],
    ids=["utf16-le-bom", "utf16-be-bom", "utf8-bom", "latin1", "cp1252"],
)
def test_encodings(tmp_path, raw, expected):
    assert text_of(tmp_path, "doc.txt", raw) == expected


def test_each_document_records_what_its_bytes_were_decoded_as(tmp_path):
    """A fallback decoding was logged but the corpus table did not say which rows it touched."""
    (tmp_path / "new.txt").write_bytes("“quoted” – dash".encode())
    (tmp_path / "old.txt").write_bytes("“old” – dash".encode("cp1252"))
    (tmp_path / "wide.txt").write_bytes("\ufeffwide text".encode("utf-16-le"))
    (tmp_path / "page.html").write_bytes(
        b'<html><head><meta charset="iso-8859-1"></head><body>Caf\xe9</body></html>'
    )
    documents, _ = load_dir(tmp_path)
    assert {name: d.encoding for name, d in documents.items()} == {
        "new.txt": "utf-8",
        "old.txt": "windows-1252",
        "wide.txt": "utf-16",
        "page.html": "iso-8859-1",
    }


def test_a_fallback_decoding_is_logged_naming_the_file(tmp_path, caplog):
    """Invalid UTF-8 read as Windows-1252 was documented but said nowhere in a run."""
    with caplog.at_level(logging.WARNING, logger="cartridges.documents.loaders"):
        assert text_of(tmp_path, "old.txt", "“quoted” – dash".encode("cp1252"))
    (record,) = caplog.records
    assert "old.txt is not valid UTF-8" in record.getMessage()
    assert "decoded as Windows-1252" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cartridges.documents.loaders"):
        (tmp_path / "old.txt").unlink()
        text_of(tmp_path, "new.txt", "“quoted” – dash".encode())
    assert not caplog.records


# ---------------------------------------------------------------------------- bad input


def bad_inputs(root: Path) -> dict[str, str]:
    """Write every kind of bad file; return ``{source: expected reason prefix}``."""
    files = {
        "empty.txt": (b"", "empty file"),
        "blank.md": (b"  \n\t\n", "empty after cleaning"),
        "nul.txt": (b"abc\x00\x01\x02", "binary file (NUL bytes"),
        "noise.txt": (bytes(range(1, 32)) * 20, "binary or undecodable file"),
        "image.png": (b"\x89PNG\r\n", "unsupported extension '.png'"),
        "Makefile": (b"all:\n", "no file extension"),
        "scan.pdf": (blank_pdf(), "PDF has no extractable text (1 page(s)"),
        "broken.pdf": (b"%PDF-1.4\nnot really a pdf", "unreadable PDF: "),
        "bad.json": (
            b'{\n  "text": "a",\n  "oops"\n}',
            "malformed JSON at line 4, column 1: Expecting ':'",
        ),
        "bad.jsonl": (b'{"text": "a"}\n{"text": \n', "malformed JSONL at line 2, column 10: "),
        "only_nulls.json": (b"[null]", "empty after cleaning"),
    }
    for name, (content, _) in files.items():
        (root / name).write_bytes(content)
    (root / "dangling.txt").symlink_to(root / "nowhere.txt")
    return {name: reason for name, (_, reason) in files.items()} | {
        "dangling.txt": "unreadable: No such file or directory"
    }


def test_every_bad_input_is_skipped_with_its_reason(tmp_path, caplog):
    expected = bad_inputs(tmp_path)
    (tmp_path / "good.txt").write_text("The one usable document.")
    with caplog.at_level(logging.WARNING, logger="cartridges.corpus"):
        documents, skipped = load_dir(tmp_path)
    assert list(documents) == ["good.txt"]
    assert set(skipped) == set(expected)
    for source, reason in expected.items():
        assert skipped[source].startswith(reason), (source, skipped[source])
        assert f"Skipping '{source}': {skipped[source]}" in caplog.text


def test_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "locked.txt").write_text("secret")
    real = Path.open

    def open_(self: Path, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    _, skipped = load_dir(tmp_path)
    assert skipped == {"locked.txt": "unreadable: Permission denied"}


def test_too_large_file_is_not_read(tmp_path, monkeypatch):
    (tmp_path / "small.txt").write_text("fine")
    (tmp_path / "huge.txt").write_text("x" * 2000)
    _, skipped = load_dir(tmp_path, max_file_mb=1000 / 2**20)
    assert skipped == {"huge.txt": "too large: 2000 bytes, limit 1000"}


def test_duplicate_text_is_skipped_and_ids_are_stable(tmp_path):
    (tmp_path / "a.txt").write_text("Same words.\n")
    (tmp_path / "b.md").write_text("Same words.")
    documents, skipped = load_dir(tmp_path)
    assert skipped == {"b.md": "duplicate of 'a.txt' (same text)"}
    # The id depends on the text only: moved or renamed, a document keeps it.
    (tmp_path / "a.txt").rename(tmp_path / "renamed.txt")
    again, _ = load_dir(tmp_path)
    assert again["b.md"].doc_id == documents["a.txt"].doc_id


def test_missing_inputs(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    config = CorpusConfig(
        corpus_dir=str(tmp_path / "nope"),
        paths=[str(tmp_path / "good.txt"), str(tmp_path / "gone.pdf")],
    )
    documents, skipped = load_corpus(config)
    assert [d.source for d in documents] == [str(tmp_path / "good.txt")]
    assert {s.source: s.reason for s in skipped} == {
        f"{tmp_path}/nope": "missing: no such folder",
        str(tmp_path / "gone.pdf"): "missing: no such file or folder",
    }


def test_nothing_usable_is_a_clear_error(tmp_path):
    bad_inputs(tmp_path)
    with pytest.raises(CorpusError, match="No usable document") as error:
        load_dir(tmp_path)
    assert "empty.txt: empty file" in str(error.value)
    with pytest.raises(CorpusError, match="skipped 1\n.*missing: no such folder"):
        load_dir(tmp_path / "no_such_dir")  # the folder itself is the one skip
    (tmp_path / "void").mkdir()
    with pytest.raises(CorpusError, match="skipped 0"):
        load_dir(tmp_path / "void")


def test_strict_turns_a_skip_into_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"Cannot use 'b.txt': empty file \(strict: true\)"):
        load_dir(tmp_path, strict=True)
    (tmp_path / "b.txt").unlink()
    assert list(load_dir(tmp_path, strict=True)[0]) == ["a.txt"]


def test_unusable_reasons_from_the_parser():
    with pytest.raises(Unusable, match="empty file"):
        parse_document(b"", "text")
    with pytest.raises(Unusable, match="binary"):
        decode_text(b"\x00\x01")


# ---------------------------------------------------------------------------- discovery


def test_include_exclude_and_hidden_files(tmp_path):
    for name in ["a.md", "b.txt", "drafts/c.md", "drafts/d.txt", ".hidden.md", ".git/HEAD"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}")
    documents, skipped = load_dir(
        tmp_path, include=["*.md", "*.txt"], exclude=[".*", "*/.*", "drafts/*.txt"]
    )
    assert list(documents) == ["a.md", "b.txt", "drafts/c.md"] and skipped == {}
    documents, _ = load_dir(tmp_path, include=["*.md"], exclude=[])
    assert set(documents) == {"a.md", "drafts/c.md", ".hidden.md"}


def test_explicit_paths_and_folders(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "x.txt").write_text("extra x")
    (tmp_path / "single.md").write_text("single")
    config = CorpusConfig(
        corpus_dir=None, paths=[str(tmp_path / "single.md"), str(tmp_path / "extra")]
    )
    documents, _ = load_corpus(config, count_tokens=lambda text: len(text.split()))
    assert [(d.source, d.n_tokens) for d in documents] == [
        (str(tmp_path / "single.md"), 1),
        (f"{tmp_path}/extra/x.txt", 2),
    ]


def test_config_is_checked():
    with pytest.raises(ValueError, match="`include` must be a list of strings"):
        CorpusConfig(include="*.md")
    with pytest.raises(ValueError, match="must be > 0"):
        CorpusConfig(url_timeout_s=0)


# ---------------------------------------------------------------------------- URLs

PAGES = {
    "/doc.html": ("text/html; charset=utf-8", b"<title>Web</title><p>Fetched page.</p>"),
    "/notes": ("text/plain; charset=iso-8859-1", "Café notes.".encode("latin-1")),
    "/paper.pdf": ("application/pdf", make_pdf(["Remote PDF text."])),
    "/data.bin": ("application/octet-stream", b"\x00\x01"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path in PAGES:
            content_type, body = PAGES[self.path]
            self._send(200, content_type, body)
        elif self.path == "/big":  # announces its size
            self._send(200, "text/plain", b"x" * 5000)
        elif self.path == "/stream":  # no Content-Length: the cap must stop the read
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 1000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, "text/plain", b"too late")
        elif self.path == "/drip":  # headers at once, then the body stalls
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"start")
            self.wfile.flush()
            time.sleep(1.5)
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    block_on_close = False  # slow handlers must not hold up the test's end

    def handle_error(self, request, client_address) -> None:
        pass  # the client hung up on a slow handler, as intended


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_urls_are_fetched(server):
    urls = [f"{server}/doc.html", f"{server}/notes", f"{server}/paper.pdf"]
    documents, skipped = load_corpus(CorpusConfig(corpus_dir=None, urls=urls))
    assert skipped == []
    assert [(d.source, d.format, d.text) for d in documents] == [
        (urls[0], "html", "Fetched page."),
        (urls[1], "text", "Café notes."),
        (urls[2], "pdf", "Remote PDF text."),
    ]
    assert documents[0].title == "Web"


def test_bad_urls_are_skipped_with_reasons(server, tmp_path):
    (tmp_path / "local.txt").write_text("Keeps the corpus usable.")
    urls = {
        f"{server}/missing": "HTTP error 404 Not Found",
        f"{server}/big": "too large: 5000 bytes, limit 4096",
        f"{server}/stream": "too large: over 4096 bytes",
        f"{server}/slow": "timed out after 0.3 s",
        f"{server}/drip": "timed out after 0.3 s",
        f"{server}/data.bin": "unsupported content type 'application/octet-stream'",
        "ftp://127.0.0.1/file.txt": "unsupported URL scheme 'ftp' (http and https only)",
        "http://127.0.0.1:9/refused.txt": "cannot fetch: [Errno 111] Connection refused",
    }
    config = CorpusConfig(
        corpus_dir=str(tmp_path), urls=list(urls), url_timeout_s=0.3, max_file_mb=4096 / 2**20
    )
    started = time.monotonic()
    documents, skipped = load_corpus(config)
    assert time.monotonic() - started < 5
    assert [d.source for d in documents] == ["local.txt"]
    assert {s.source: s.reason for s in skipped} == urls


# ---------------------------------------------------------------------------- helpers


def test_join_documents_and_statistics():
    assert join_documents(["a", "b"]) == "a\n\nb"
    report = corpus_statistics([10, 30, 20], [40, 120, 80], ["text", "pdf", "text"], [5, 5], 2)
    assert report["num_documents"] == 3 and report["num_skipped"] == 2
    assert report["total_tokens"] == 60 and report["chunk_tokens_total"] == 10
    assert report["documents_by_format"] == {"pdf": 1, "text": 2}
    assert report["document_tokens"] == {
        "min": 10.0,
        "p10": 10.0,
        "p50": 20.0,
        "p90": 30.0,
        "max": 30.0,
        "mean": 20.0,
    }


@pytest.mark.parametrize("kind", ["text", "html"])
def test_a_files_bytes_are_released_once_parsed(kind):
    """One 50 MB file held its raw bytes beside two copies of its text while it was cleaned."""
    raw = bytearray(b"<p>Pump P1 hums.</p>" if kind == "html" else b"Pump P1 hums.\r\n")
    _, text, encoding = parse_document(raw, kind)
    assert text.endswith("Pump P1 hums.") and encoding == "utf-8"
    assert raw == bytearray()  # cleared: its memory is free while the text is cleaned
    kept = b"Pump P1 hums."
    assert parse_document(kept, "text").text == "Pump P1 hums." and kept == b"Pump P1 hums."


def test_a_texts_digest_is_the_sha256_of_its_utf8_taken_in_pieces():
    text = "naïve café 日本語 🙂 " * 50
    assert text_digest(text, piece_chars=7) == hashlib.sha256(text.encode()).hexdigest()
    assert text_digest("") == hashlib.sha256(b"").hexdigest()
