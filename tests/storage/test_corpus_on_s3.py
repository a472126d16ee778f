"""A corpus folder in a bucket reads as the same folder on a disk does."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cartridges.corpus import CorpusConfig, CorpusError, load_corpus

FILES = {
    "manual.md": "# Pump P2\n\nThe seal was replaced in March.",
    "notes/alarms.txt": "Alarm E12 is low suction.",
    "notes/deeper/log.txt": "Valve V3 was opened at noon.",
    ".hidden.txt": "not read: hidden",
    "image.bin": "no parser for this",
    "big.txt": "x" * 3000,
    "zeta.txt": "Zeta: a folder's own files come before its subfolders, as a local walk gives.",
}


@pytest.fixture
def corpus(s3, monkeypatch, tmp_path) -> tuple[str, Path]:
    """The same files in a bucket and in a local folder."""
    for name, value in s3.environment.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}/corpus"
    fs = s3.filesystem()
    for name, text in FILES.items():
        fs.pipe(f"{url.removeprefix('s3://')}/{name}", text.encode())
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return url, tmp_path


def _read(corpus_dir: str) -> tuple[list, list]:
    documents, skipped = load_corpus(CorpusConfig(corpus_dir=corpus_dir, max_file_mb=0.002))
    return (
        [(d.source, d.text) for d in documents],
        sorted((s.source, s.reason) for s in skipped),
    )


def test_a_corpus_folder_in_a_bucket_gives_what_the_same_folder_on_disk_gives(corpus):
    url, local = corpus
    documents, skipped = _read(url)
    assert (documents, skipped) == _read(str(local))
    assert [source for source, _ in documents] == [
        "manual.md",
        "zeta.txt",
        "notes/alarms.txt",
        "notes/deeper/log.txt",
    ]
    assert dict(skipped)["big.txt"].startswith("too large: 3000 bytes")
    assert dict(skipped)["image.bin"] == "unsupported extension '.bin'"


def test_a_missing_corpus_folder_in_a_bucket_is_named(s3, monkeypatch):
    for name, value in s3.environment.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}/none"
    with pytest.raises(CorpusError, match=f"{url}: missing: no such folder"):
        load_corpus(CorpusConfig(corpus_dir=url))
