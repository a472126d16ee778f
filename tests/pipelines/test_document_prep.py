"""document_prep end to end on the tiny model: mixed formats, bad inputs, both chunkers, report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner
from kedro_datasets.pickle import PickleDataset

from cartridges.corpus_tables import CHUNK_COLUMNS, CORPUS_COLUMNS
from cartridges.modeling import load_tokenizer
from cartridges.pipelines.document_prep import create_pipeline
from tests.conftest import CORPUS
from tests.test_corpus import make_pdf

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ["corpus", "skipped_documents", "chunk_set", "corpus_statistics", "document_prep_metrics"]


@pytest.fixture()
def corpus_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "papers").mkdir(parents=True)
    (root / "manual.md").write_text("# Pump\n\n" + CORPUS + "\n\n## Alarms\n\nE21 is a leak.\n")
    (root / "papers" / "seal.tex").write_text("\\section{Seals}\n% draft note\nSeals wear.\n")
    (root / "papers" / "study.pdf").write_bytes(make_pdf(["Seal study.\nLeaks fell by half."]))
    (root / "faq.jsonl").write_text('{"text": "Q: who built it? A: Halvard."}\n')
    (root / "page.html").write_text("<script>x()</script><p>Web page about the pump.</p>")
    (root / "notes.txt").write_bytes("Notes in UTF-16: Grüße.".encode("utf-16"))
    (root / "empty.txt").write_bytes(b"")
    (root / "bad.json").write_text('{"text": ')
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    return root


def run(tiny_model_dir: Path, corpus_dir: Path, **overrides) -> dict:
    chunking = {"num_chunks": 5, "min_tokens": 8, "max_tokens": 24, "seed": 0}
    params = {
        "corpus_dir": str(corpus_dir),
        "include": ["*"],
        "exclude": [],
        "strict": False,
        "chunking": chunking | overrides.pop("chunking", {}),
    } | overrides
    # Persisted, so that the runner's release of finished datasets keeps them readable.
    store = Path(tempfile.mkdtemp(dir=corpus_dir.parent))
    catalog = DataCatalog({n: PickleDataset(filepath=str(store / f"{n}.pkl")) for n in OUTPUTS})
    catalog["params:document_prep"] = params
    catalog["params:model"] = {"name_or_path": str(tiny_model_dir)}
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog[name].load() for name in OUTPUTS}


def test_document_prep_reads_every_format_and_accounts_for_every_input(tiny_model_dir, corpus_dir):
    out = run(tiny_model_dir, corpus_dir, chunking={"description": "Pump documentation."})
    corpus, skipped = out["corpus"], out["skipped_documents"]
    assert list(corpus.columns) == CORPUS_COLUMNS
    assert dict(zip(corpus["source"], corpus["format"], strict=True)) == {
        "faq.jsonl": "jsonl",
        "manual.md": "markdown",
        "notes.txt": "text",
        "page.html": "html",
        "papers/seal.tex": "latex",
        "papers/study.pdf": "pdf",
    }
    assert dict(zip(skipped["source"], skipped["reason"], strict=True)) == {
        "bad.json": "malformed JSON at line 1, column 10: Expecting value",
        "empty.txt": "empty file",
        "photo.jpg": "unsupported extension '.jpg'",
    }
    every_file = {p.relative_to(corpus_dir).as_posix() for p in corpus_dir.rglob("*.*")}
    assert set(corpus["source"]) | set(skipped["source"]) == every_file

    texts = dict(zip(corpus["source"], corpus["text"], strict=True))
    assert texts["papers/seal.tex"] == "\\section{Seals}\nSeals wear."
    assert texts["page.html"] == "Web page about the pump."
    assert texts["notes.txt"] == "Notes in UTF-16: Grüße."
    assert "Leaks fell by half." in texts["papers/study.pdf"]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for text, n_tokens in zip(corpus["text"], corpus["n_tokens"], strict=True):
        assert n_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chunks = out["chunk_set"]
    assert list(chunks.columns) == CHUNK_COLUMNS and len(chunks) == 5
    assert set(chunks["doc_id"]) <= set(corpus["doc_id"])
    assert chunks["text"].str.startswith("Pump documentation.\n\n").all()
    assert (chunks["token_end"] - chunks["token_start"] == chunks["n_tokens"]).all()

    report = out["corpus_statistics"]
    json.dumps(report)  # the versioned report is JSON
    assert report["num_documents"] == 6 and report["num_skipped"] == 3
    assert report["num_chunks"] == 5 and report["total_tokens"] == corpus["n_tokens"].sum()
    assert report["document_tokens"]["max"] == corpus["n_tokens"].max()
    metrics = out["document_prep_metrics"]
    assert metrics["num_documents"] == {"value": 6.0, "step": 0}
    assert metrics["chunk_tokens.p50"]["step"] == 0
    assert all(isinstance(m["value"], float) for m in metrics.values())


def test_structural_chunking_covers_each_document_once(tiny_model_dir, corpus_dir):
    out = run(tiny_model_dir, corpus_dir, chunking={"method": "structural", "max_tokens": 40})
    corpus, chunks = out["corpus"], out["chunk_set"]
    assert chunks["n_tokens"].max() <= 40
    per_doc = chunks.groupby("doc_id")["n_tokens"].sum()
    assert per_doc.to_dict() == dict(zip(corpus["doc_id"], corpus["n_tokens"], strict=True))
    manual_id = corpus.set_index("source").loc["manual.md", "doc_id"]
    manual_chunks = chunks[chunks["doc_id"] == manual_id]["text"].str.lstrip()
    assert manual_chunks.str.startswith("## Alarms").any()


def test_document_prep_is_deterministic(tiny_model_dir, corpus_dir):
    first = run(tiny_model_dir, corpus_dir)
    second = run(tiny_model_dir, corpus_dir)
    for name in ("corpus", "skipped_documents", "chunk_set"):
        pd.testing.assert_frame_equal(first[name], second[name])
    assert first["corpus_statistics"] == second["corpus_statistics"]
    reseeded = run(tiny_model_dir, corpus_dir, chunking={"seed": 1})
    assert not reseeded["chunk_set"].equals(first["chunk_set"])


def test_strict_and_misspelt_parameters_fail_clearly(tiny_model_dir, corpus_dir):
    with pytest.raises(ValueError, match="Cannot use 'bad.json': malformed JSON at line 1"):
        run(tiny_model_dir, corpus_dir, strict=True)
    with pytest.raises(ValueError, match="document_prep.corpus_folder'; did you mean 'corpus_dir'"):
        run(tiny_model_dir, corpus_dir, corpus_folder="x")
    with pytest.raises(ValueError, match="No usable document"):
        run(tiny_model_dir, corpus_dir, include=["*.jpg", "*.json"])


def test_catalog_versions_the_outputs_and_logs_metrics_to_mlflow():
    catalog = yaml.safe_load((ROOT / "conf/base/catalog.yml").read_text())
    for name in ("corpus", "skipped_documents", "chunk_set", "corpus_statistics"):
        assert catalog[name]["versioned"] is True
    assert catalog["corpus_statistics"]["type"] == "json.JSONDataset"
    metrics_type = "kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset"
    assert catalog["document_prep_metrics"]["type"] == metrics_type
    params = yaml.safe_load((ROOT / "conf/base/parameters_document_prep.yml").read_text())
    assert params["document_prep"]["chunking"]["method"] in ("token_windows", "structural")


def test_the_corpus_table_keeps_every_text_exactly_across_arrow_flushes(monkeypatch):
    from cartridges.corpus import Document
    from cartridges.corpus_tables import CorpusTable

    texts = ["Grüße, 世界 🙂", "plain", "a\nb\x00c", "é" * 7, "last one"]
    documents = [
        Document(f"id{i}", f"s{i}", "txt", f"t{i}", text, "0" * 64, len(text), i)
        for i, text in enumerate(texts)
    ]
    monkeypatch.setattr(CorpusTable, "FLUSH_CHARS", 10)  # several Arrow chunks
    table = CorpusTable()
    for document in documents:
        table.add(document)
    frame = table.frame()
    expected = pd.DataFrame([vars(d) for d in documents], columns=CORPUS_COLUMNS)
    pd.testing.assert_frame_equal(frame, expected)
    assert frame["text"].dtype == pd.Series(["x"]).dtype  # pandas' default string dtype
