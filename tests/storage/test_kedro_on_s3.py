"""`kedro run --env s3`: the whole catalog, the shards and the checkpoints in a bucket of a real S3
server; a two-process torchrun training reading its targets from there; a resumed evaluation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_run import project  # noqa: F401, F811 - the fixture: a fresh copy of the project

REDUCED = ",".join(
    [
        "self_study.num_conversations=64",
        "distill_training.train.max_steps=8",
        "distill_training.sweep_compressions=[]",
        "evaluation.tasks=[qa]",
        "evaluation.decode_batch_sizes=[1]",
    ]
)


def _kedro(root: Path, s3, *args: str, launcher: tuple[str, ...] = ()):
    env = {**os.environ, **s3.environment, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "400"}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, *launcher, "-m", "kedro", "run", "--env", "s3", *args]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def _local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "data").rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_default_run_keeps_every_artifact_in_the_bucket(project, s3):  # noqa: F811
    before = _local_files(project)
    _kedro(project, s3, "--params", REDUCED)
    assert _local_files(project) == before  # nothing written beside the shipped inputs
    fs, data = s3.filesystem(), f"{s3.bucket}/data"
    for entry, name in [
        ("02_intermediate/corpus.parquet", "corpus.parquet"),
        ("03_primary/conversations", "conversations/_manifest.json"),
        ("04_feature/teacher_logprobs", "teacher_logprobs/_manifest.json"),
        ("06_models/cartridge.safetensors", "cartridge.safetensors"),
        ("08_reporting/evaluation_report.csv", "evaluation_report.csv"),
    ]:
        assert len(fs.glob(f"{data}/{entry}/*/{name}")) == 1, entry
    assert fs.glob(f"{data}/03_primary/self_study_shards/*/targets-000000.parquet")
    assert fs.glob(f"{data}/06_models/checkpoints/*/state.pt")

    # Two processes train from the targets in the bucket; rank 0 alone writes the cartridge.
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    params = "distill_training.train.micro_batch_size=4,distill_training.train.max_steps=6,"
    params += "distill_training.sweep_compressions=[]"
    output = _kedro(
        project, s3, "--pipelines", "distill_training", "--params", params, launcher=launcher
    )
    assert "rank 1 of 2" in output
    assert len(fs.glob(f"{data}/06_models/cartridge.safetensors/*/cartridge.safetensors")) == 2

    # Evaluation again: the methods it already scored are read back from the bucket.
    output = _kedro(project, s3, "--pipelines", "evaluation", "--params", REDUCED)
    assert f"Evaluation resumed from s3://{data}/07_model_output/evaluation_results" in output
    assert len(fs.glob(f"{data}/08_reporting/evaluation_report.csv/*/evaluation_report.csv")) == 2
    assert _local_files(project) == before
