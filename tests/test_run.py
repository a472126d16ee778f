"""End to end: `kedro run` and `kedro viz build` on a copy of the project, as a user runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEDRO = [sys.executable, "-m", "kedro"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tracked project files (config, example corpus, embedded model) in a fresh directory."""
    copy = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(
        ["git", "ls-files", "conf", "data", "src", "pyproject.toml", "README.md"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for relative in tracked:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, copy / relative)
    return copy


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [*KEDRO, *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_default_pipeline_runs_from_a_fresh_copy(project):
    result = _run(project, "run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Evaluation report" in result.stdout + result.stderr
    reports = list(
        (project / "data/08_reporting/evaluation_report.csv").glob("*/evaluation_report.csv")
    )
    assert len(reports) == 1
    report = pd.read_csv(reports[0])
    assert {"icl", "no_context", "cartridge"} <= set(report["method"])
    assert len(list((project / "data/06_models/cartridge.safetensors").iterdir())) == 1
    assert len(list((project / "data/08_reporting/tradeoff_plot.png").glob("*/*.png"))) == 1
    assert (project / "mlflow.db").exists()  # tracking went to the local sqlite store


@pytest.mark.slow
def test_viz_build_renders_the_pipelines(project):
    result = _run(project, "viz", "build")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    main = project / "build" / "api" / "main"
    assert main.exists()
    graph = main.read_text()
    for node in ("load_documents_node", "synthesize_conversations_node", "distill_cartridge_node"):
        assert node.split("_node")[0] in graph
