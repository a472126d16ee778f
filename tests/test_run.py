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
    """The project files (config, example corpus, embedded model, code) in a fresh directory."""
    copy = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "conf",
            "data",
            "src",
            "pyproject.toml",
        ],
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


@pytest.mark.slow
def test_torchrun_trains_with_two_processes_and_rank_zero_writes(project):
    # Runs after the default pipeline above, so conversations and teacher_logprobs exist.
    before = set((project / "data/06_models/cartridge.safetensors").iterdir())
    env_args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [
            sys.executable,
            *env_args,
            "-m",
            "kedro",
            "run",
            "--pipeline",
            "distill_training",
            "--params",
            "distill_training.train.micro_batch_size=4",  # 8 rows = 4 per process x 2
        ],
        cwd=project,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rank 1 of 2" in result.stdout + result.stderr
    new = set((project / "data/06_models/cartridge.safetensors").iterdir()) - before
    assert len(new) == 1  # one version, written by rank 0 only
