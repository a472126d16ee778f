"""The folders the library writes, on a real S3 server: a job killed with SIGKILL on one machine
resumes on another (here: a fresh process with nothing local), and two writers never interleave."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from cartridges.evaluation.methods import Method
from cartridges.evaluation.results import EvaluationResults
from cartridges.initialization import from_cartridge
from cartridges.storage import Location
from cartridges.synthesis.runs import LOCK_FILE, run_key, run_self_study
from cartridges.synthesis.self_study import SelfStudyConfig
from cartridges.training import TrainConfig, train_cartridge
from tests.resume_worker import CONFIG as TRAIN_CONFIG
from tests.synthesis.self_study_worker import CHUNKS, SETTINGS, study
from tests.training_data import setting

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def on_s3(s3, monkeypatch):
    """A fresh URL prefix, with the server's endpoint and key in the environment (how library
    folders such as shard_dir find their credentials), for this process and its children."""
    for name, value in s3.environment.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _conversation_shards(s3, url: str) -> int:
    return len(s3.filesystem().glob(f"{url.removeprefix('s3://')}/*/conversations-*.parquet"))


def test_self_study_killed_with_sigkill_resumes_from_the_store(tiny_model_dir, tmp_path, s3, on_s3):
    conversations, targets, _ = run_self_study(
        study(str(tiny_model_dir)), CHUNKS, tmp_path, "local"
    )
    reference = conversations.to_pandas(), targets.to_pandas()
    shards, output = f"{on_s3}/shards", tmp_path / "out"
    command = [sys.executable, "-m", "tests.synthesis.self_study_worker", str(tiny_model_dir)]
    command += [shards, str(output)]
    process = subprocess.Popen([*command, "0.5", "3"], cwd=ROOT, env=_env())  # a 3 s lease
    deadline = time.time() + 120
    while time.time() < deadline and _conversation_shards(s3, shards) < 2:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 2 <= _conversation_shards(s3, shards) < 4
    assert not Path(f"{output}-conversations.parquet").exists()
    # The lease of the killed run is still there: the next run takes it over once it has seen it
    # unrenewed for the killed holder's 3 s (on its own clock).
    lease = f"{shards.removeprefix('s3://')}/*/{LOCK_FILE}"
    (held,) = s3.filesystem().glob(lease)
    assert json.loads(s3.filesystem().cat(held))["seconds"] == 3
    result = subprocess.run([*command, "0"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Took over the lease" in result.stderr
    assert "Another process is running this self-study" in result.stderr  # it waited first
    pd.testing.assert_frame_equal(pd.read_parquet(f"{output}-conversations.parquet"), reference[0])
    pd.testing.assert_frame_equal(pd.read_parquet(f"{output}-targets.parquet"), reference[1])
    assert not s3.filesystem().glob(lease)  # released


def test_a_second_self_study_on_the_store_waits_for_the_lease(tiny_model_dir, tmp_path, on_s3):
    shards, output = f"{on_s3}/shards", tmp_path / "out"
    directory = Location.of(shards) / run_key(SelfStudyConfig(**SETTINGS), CHUNKS, "local")
    lock = directory / LOCK_FILE
    command = [sys.executable, "-m", "tests.synthesis.self_study_worker", str(tiny_model_dir)]
    command += [shards, str(output), "0"]
    with lock.store.lock(lock.path, lease_seconds=4):  # another machine runs this self-study
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
        for line in process.stderr:
            if "Another process is running this self-study" in line:
                break
        else:
            pytest.fail(f"the second process did not wait (exit {process.wait()})")
        time.sleep(6)  # longer than the lease: renewed, so still held
        assert process.poll() is None
        assert not [n for n in directory.children() if n.endswith(".parquet")]
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 0, rest
    assert len(pd.read_parquet(f"{output}-conversations.parquet")) == SETTINGS["num_conversations"]


def test_training_killed_with_sigkill_resumes_from_a_checkpoint_on_the_store(tmp_path, s3, on_s3):
    model, _, examples, cartridge = setting()
    reference, _ = train_cartridge(
        model, from_cartridge(cartridge), examples, TrainConfig(**TRAIN_CONFIG), pad_token_id=0
    )
    checkpoints = f"{on_s3}/checkpoints"
    command = [sys.executable, "-m", "tests.resume_worker", checkpoints, str(tmp_path / "out.pt")]
    process = subprocess.Popen([*command, "0.3"], cwd=ROOT, env=_env())
    fs, deadline = s3.filesystem(), time.time() + 120
    while time.time() < deadline:
        states = fs.glob(f"{checkpoints.removeprefix('s3://')}/*/state.pt")
        if states:
            with fs.open(states[0]) as handle:
                if torch.load(handle, weights_only=True)["step"] >= 4:
                    break
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out.pt").exists()  # it really died mid-run
    result = subprocess.run([*command, "0"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    remaining = int(re.search(r"distill: +\d+%\S* +\d+/(\d+)", result.stderr).group(1))
    assert remaining < TRAIN_CONFIG["max_steps"]  # it went on from the checkpoint
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(resumed, reference.keys, atol=1e-6)


def test_evaluation_results_are_kept_on_the_store(on_s3):
    method = Method(name="no_context", kind="no_context", prefix=None)
    EvaluationResults(f"{on_s3}/results", "key").save(method, "qa", [{"score": 0.5}])
    assert EvaluationResults(f"{on_s3}/results", "key").load(method, "qa") == [{"score": 0.5}]
    assert EvaluationResults(f"{on_s3}/results", "other").load(method, "qa") is None
