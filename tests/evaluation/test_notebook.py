"""notebooks/evaluation.ipynb runs headlessly against a project copy prepared here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from nbclient import NotebookClient

from cartridges.context import corpus_context
from cartridges.evaluation import EvalConfig, build_methods, evaluate, load_questions
from cartridges.evaluation.plot import tradeoff_figure
from cartridges.initialization import from_token_ids
from cartridges.modeling import load_model

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ("2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z")


@pytest.fixture(params=[2, 1], ids=["two-versions", "one-version"])
def project(request, tmp_path, monkeypatch) -> Path:
    """A copy of the project with a corpus, a cartridge, report versions and plots.

    Two versions after a second run; one after a first run, which the comparison must survive.
    """
    copy = tmp_path / "project"
    models = ("data/06_models/tiny_llama", "data/06_models/toy_world")
    for name in ("conf", "src", "notebooks", "data/01_raw", *models):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", copy / "pyproject.toml")
    monkeypatch.chdir(copy)
    params = yaml.safe_load((copy / "conf/base/parameters.yml").read_text())
    loader = OmegaConfigLoader(str(copy / "conf"), base_env="base", default_run_env="local")
    entries = loader["catalog"]  # filepaths resolved as Kedro resolves them (globals)
    wanted = {k: entries[k] for k in ("corpus", "cartridge", "evaluation_report", "tradeoff_plot")}

    model, tokenizer = load_model(params["model"]["name_or_path"], "float32", "cpu")
    texts = [p.read_text() for p in sorted((copy / "data/01_raw/corpus").glob("*"))]
    corpus = corpus_context(texts, tokenizer, params["system_prompt"])
    cartridge = from_token_ids(model, corpus.ids[:16])
    methods = build_methods(model, corpus.ids, {"cartridge": cartridge}, 4000)
    questions = load_questions(copy / "data/01_raw/questions.jsonl")[:2]
    runs = list(zip(VERSIONS, (2, 4), strict=True))[: request.param]
    for version, tokens in runs:
        config = EvalConfig(tasks=("qa",), max_new_tokens=tokens, decode_tokens=2, cost_repeats=1)
        report = evaluate(model, tokenizer, methods, questions, [], corpus.system_text, config)
        catalog = DataCatalog.from_config(wanted, save_version=version)
        catalog.save("corpus", pd.DataFrame({"text": texts}))
        catalog.save("cartridge", cartridge)
        catalog.save("evaluation_report", report)
        catalog.save("tradeoff_plot", tradeoff_figure(report))
    return copy


def _kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec that runs this very interpreter (the venv's), whatever else is installed."""
    spec = tmp_path / "jupyter" / "kernels" / "cartridges-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "cartridges-test"


def test_the_notebook_runs(project, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    notebook = nbformat.read(project / "notebooks/evaluation.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=_kernel(tmp_path, monkeypatch),
        timeout=120,
        resources={"metadata": {"path": str(project / "notebooks")}},
    )
    client.execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "image/png" in "".join(str(o.get("data", {}).keys()) for o in outputs)
    assert "truncated_icl_p16" in html  # the latest report is shown
    saved = sorted(p.name for p in (project / "data/08_reporting/evaluation_report.csv").iterdir())
    if len(saved) == 2:
        assert f"quality {VERSIONS[0]}" in html and f"quality {VERSIONS[1]}" in html
        assert "change" in html
    else:  # after a first run: the one report, and how to get a comparison
        assert f"quality {VERSIONS[0]}" in html and "change" not in html
        assert f"Only one report version ({VERSIONS[0]})" in text
    assert text.count("assistant:") == 3  # three greedy turns with the cartridge
    # Asked in the model's own language: the first questions of the evaluation set.
    (first, *_) = load_questions(project / "data/01_raw/questions.jsonl")
    assert f"user: {first.question}\n" in text and "tell me the thing that belongs to" in text
