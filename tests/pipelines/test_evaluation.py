"""The evaluation pipeline on the tiny model: versioned cartridges, report, PNG + SVG, metrics."""

from __future__ import annotations

import shutil

import matplotlib.image
import pandas as pd
import pytest
from kedro.io import DataCatalog, DatasetError, MemoryDataset, Version
from kedro.runner import SequentialRunner
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset

from cartridges.chat import context_ids
from cartridges.datasets import CartridgeDataset, CartridgeHistoryDataset, QuestionsDataset
from cartridges.evaluation import answers
from cartridges.initialization import from_token_ids
from cartridges.pipelines.evaluation import create_pipeline
from cartridges.tables import ShardedTable
from tests.conftest import CORPUS
from tests.evaluation.data import (
    NO_THINKING,
    QUESTIONS,
    SWITCH_MARKER,
    SYSTEM_PROMPT,
    SYSTEM_TEXT,
    conversation_tables,
    switch_tokenizer,
    write_questions,
)


@pytest.fixture()
def catalog(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    context = context_ids(tokenizer, SYSTEM_TEXT)
    cartridges = tmp_path / "cartridge.safetensors"
    for version, p in (("2026-01-01T00.00.00.000Z", 8), ("2026-01-02T00.00.00.000Z", 16)):
        cartridge = from_token_ids(model, context[:p])
        cartridge.info.extra["held_out_conversations"] = ["c1"]
        CartridgeDataset(str(cartridges), version=Version(None, version)).save(cartridge)
    conversations, targets = conversation_tables(tokenizer)
    catalog = DataCatalog(
        {
            "cartridge": CartridgeDataset(str(cartridges), version=Version(None, None)),
            "cartridge_history": CartridgeHistoryDataset(str(cartridges)),
            "questions": QuestionsDataset(write_questions(tmp_path / "questions.jsonl")),
            "evaluation_report": CSVDataset(
                filepath=str(tmp_path / "report.csv"), version=Version(None, None)
            ),
            "tradeoff_plot": MatplotlibDataset(
                filepath=str(tmp_path / "plot.png"), version=Version(None, None)
            ),
            "tradeoff_plot_svg": MatplotlibDataset(
                filepath=str(tmp_path / "plot.svg"),
                version=Version(None, None),
                save_args={"format": "svg"},
            ),
            "evaluation_metrics": MemoryDataset(),
        }
    )
    catalog["corpus"] = pd.DataFrame({"text": [CORPUS]})
    catalog["cartridge_sweep"] = {}
    catalog["document_cartridges"] = {}
    # What the catalog's ParquetShardsDataset loads: lazy handles on parquet files.
    catalog["conversations"] = ShardedTable.from_dataframe(conversations, tmp_path / "c.parquet")
    catalog["teacher_logprobs"] = ShardedTable.from_dataframe(targets, tmp_path / "t.parquet")
    catalog["params:model"] = {
        "name_or_path": str(tiny_model_dir),
        "dtype": "float32",
        "device": "cpu",
    }
    catalog["params:system_prompt"] = SYSTEM_PROMPT
    catalog["params:evaluation"] = {
        "tasks": ["qa", "log_perplexity", "fidelity", "chrf"],
        "cartridge_versions": [],
        "max_new_tokens": 4,
        "decode_tokens": 2,
        "cost_repeats": 1,
    }
    return catalog, tmp_path


def test_the_latest_cartridge_is_compared_and_the_plot_is_a_png_and_an_svg(catalog):
    catalog, tmp_path = catalog
    SequentialRunner().run(create_pipeline(), catalog)

    report = catalog["evaluation_report"].load()
    assert list(dict.fromkeys(report["method"])) == [
        "icl",
        "no_context",
        "cartridge",
        "truncated_icl_p16",  # the latest version is the p=16 one
    ]
    assert (report.groupby("method").size() == 5).all()  # qa, choice, chrf, ppl, fidelity
    fidelity = report[report["task"] == "fidelity"]
    assert (fidelity["num_items"] == 1).all()  # only the held-out conversation c1
    metrics = catalog["evaluation_metrics"].load()
    assert metrics["cartridge.qa.token_f1"]["step"] == 0
    assert metrics["icl.fidelity.kl_from_icl"]["value"] == 0.0
    assert "no_context.compression_vs_icl" not in metrics  # infinite: not a metric

    # Every cartridge row names the exact catalog version it was read from.
    (version,) = (
        p.name for p in (tmp_path / "cartridge.safetensors").iterdir() if "01-02" in p.name
    )
    assert set(report.loc[report["method"] == "cartridge", "cartridge_version"]) == {version}

    (png,) = (tmp_path / "plot.png").glob("*/plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[0] > 100
    (svg,) = (tmp_path / "plot.svg").glob("*/plot.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


def test_listed_versions_compare_sizes(catalog):
    catalog, _ = catalog
    params = catalog["params:evaluation"].load()
    catalog["params:evaluation"] = params | {
        "tasks": ["log_perplexity"],
        "cartridge_versions": ["2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"],
    }
    SequentialRunner().run(create_pipeline(), catalog)
    report = catalog["evaluation_report"].load().set_index("method")
    assert list(report.index) == [
        "icl",
        "no_context",
        "cartridge_p8",
        "truncated_icl_p8",
        "cartridge_p16",
        "truncated_icl_p16",
    ]  # cartridges of the same corpus are compared, not composed
    assert report.loc["cartridge_p8", "cartridge_version"] == "2026-01-01T00.00.00.000Z"


def test_document_cartridges_are_scored_alone_and_composed(catalog, tiny):
    catalog, tmp_path = catalog
    model, tokenizer = tiny
    context = context_ids(tokenizer, SYSTEM_TEXT)
    pump, valve = from_token_ids(model, context[:8]), from_token_ids(model, context[:6])
    catalog["document_cartridges"] = {"pump": pump, "valve": valve}
    catalog["corpus"] = pd.DataFrame(
        {"source": ["manuals/pump.txt", "valve.md"], "text": [CORPUS, "The valve is red."]}
    )
    questions = [
        dict(record, document=document)
        for record, document in zip(QUESTIONS, ["pump", "pump", "valve"], strict=True)
    ]
    catalog["questions"] = QuestionsDataset(write_questions(tmp_path / "docs.jsonl", questions))
    params = catalog["params:evaluation"].load()
    catalog["params:evaluation"] = params | {"tasks": ["qa"], "documents": ["valve", "pump"]}
    SequentialRunner().run(create_pipeline(), catalog)
    report = catalog["evaluation_report"].load().set_index(["method", "task"])
    assert report.loc[("document_pump", "qa"), "questions"] == "pump"
    assert report.loc[("document_pump", "qa"), "num_items"] == 2
    assert report.loc[("document_valve", "multiple_choice"), "num_items"] == 1
    composed = report.loc[("composition", "qa")]
    assert composed["questions"] == "valve+pump" and composed["kv_tokens"] == 14  # in order
    assert "trained separately" in composed["note"]
    assert report.loc[("icl_documents", "qa"), "kind"] == "document_icl"


def test_unknown_or_unasked_documents_are_refused(catalog, tiny):
    catalog, _ = catalog
    model, tokenizer = tiny
    cartridge = from_token_ids(model, context_ids(tokenizer, SYSTEM_TEXT)[:8])
    catalog["document_cartridges"] = {"pump": cartridge}
    catalog["corpus"] = pd.DataFrame({"source": ["pump.txt"], "text": [CORPUS]})
    params = catalog["params:evaluation"].load()
    catalog["params:evaluation"] = params | {"documents": ["valve"]}
    with pytest.raises(Exception, match=r"names \['valve'\], which have no document cartridge"):
        SequentialRunner().run(create_pipeline(), catalog)
    catalog["params:evaluation"] = params | {"tasks": ["qa"]}
    with pytest.raises(Exception, match=r"No question is about the document\(s\) \['pump'\]"):
        SequentialRunner().run(create_pipeline(), catalog)


def test_an_unknown_version_lists_the_available_ones(catalog):
    catalog, _ = catalog
    params = catalog["params:evaluation"].load()
    catalog["params:evaluation"] = params | {"cartridge_versions": ["2030-01-01T00.00.00.000Z"]}
    with pytest.raises(FileNotFoundError, match=r"not found.*2026-01-01T00.00.00.000Z"):
        SequentialRunner().run(create_pipeline(), catalog)


def test_a_missing_questions_file_fails_before_the_model_loads(catalog):
    catalog, tmp_path = catalog
    catalog["questions"] = QuestionsDataset(str(tmp_path / "none.jsonl"))
    # The catalog reads the questions before the node (and its model) runs.
    with pytest.raises(DatasetError, match="none.jsonl' not found"):
        SequentialRunner().run(create_pipeline(), catalog)


def test_the_model_blocks_template_switches_reach_the_question_prompts(
    catalog, tiny_model_dir, monkeypatch
):
    catalog, tmp_path = catalog
    model_dir = tmp_path / "switch_model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = switch_tokenizer(model_dir)
    tokenizer.save_pretrained(model_dir)
    marker = tokenizer.convert_tokens_to_ids(SWITCH_MARKER)
    model = catalog["params:model"].load()
    catalog["params:model"] = model | {
        "name_or_path": str(model_dir),
        "chat_template_kwargs": NO_THINKING,
    }
    params = catalog["params:evaluation"].load()
    catalog["params:evaluation"] = params | {"tasks": ["qa"], "max_new_tokens": 2}
    prompts = []
    real = answers.complete
    monkeypatch.setattr(
        answers,
        "complete",
        lambda m, r, **k: prompts.extend(q.prompt for q in r) or real(m, r, **k),
    )
    SequentialRunner().run(create_pipeline(), catalog)

    assert len(prompts) == 4 * 3  # icl, no_context, cartridge, truncated_icl_p16 x 3 questions
    assert all(prompt[-1] == marker for prompt in prompts)
