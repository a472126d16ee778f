"""Synthesis as a stream: many batches in flight under one bound, failures, out-of-order kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cartridges.modeling import load_tokenizer
from cartridges.synthesis.backends import BackendError
from cartridges.synthesis.openai_backend import OpenAIBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from cartridges_testing.stand_in_teacher import StandInTeacher, TeacherSettings
from tests.synthesis import stream_worker

CHUNKS = stream_worker.CHUNKS[1:]


def _teacher(model_dir, **overrides) -> StandInTeacher:
    tokenizer = load_tokenizer(str(model_dir))
    settings = dict(
        delay_ms=20, answer_tokens=6, question_tokens=4, vocab_size=len(tokenizer), pool=16
    )
    return StandInTeacher(TeacherSettings(tokenizer=str(model_dir), **{**settings, **overrides}))


def _study(model_dir, base_url, max_concurrency=4, num_conversations=12, **backend) -> SelfStudy:
    tokenizer = load_tokenizer(str(model_dir))
    backend = OpenAIBackend(
        tokenizer,
        [base_url],
        "stand-in",
        max_concurrency=max_concurrency,
        **{"max_retries": 3, "backoff_s": 0.01, **backend},
    )
    settings = {**stream_worker.SETTINGS, "num_conversations": num_conversations}
    return SelfStudy(backend, tokenizer, SelfStudyConfig(**settings))


def _tables(study, shard_dir):
    conversations, targets, _ = run_self_study(study, CHUNKS, shard_dir, "s")
    return conversations.to_pandas(), targets.to_pandas()


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    with _teacher(tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_model_dir, teacher, tmp_path_factory):
    return _tables(_study(tiny_model_dir, teacher.base_url), tmp_path_factory.mktemp("ref"))


def test_requests_of_many_batches_share_one_bound(tiny_model_dir, tmp_path):
    with _teacher(tiny_model_dir, delay_ms=150) as slow:
        study = _study(tiny_model_dir, slow.base_url, max_concurrency=6, num_conversations=24)
        conversations, _ = _tables(study, tmp_path)
        health = slow.health()
    assert len(conversations) == 24 and conversations["conversation_id"].is_unique
    # Batches have 2 rows: the bound of 6 is reached only with several batches in flight.
    assert health["peak_in_flight"] == 6


@pytest.mark.parametrize("fault", ["503", "429", "drop", "malformed"])
def test_transient_failures_are_retried(tiny_model_dir, reference, tmp_path, fault):
    with _teacher(tiny_model_dir, fail_every=3, fail_with=fault) as flaky:
        conversations, targets = _tables(_study(tiny_model_dir, flaky.base_url), tmp_path)
        assert flaky.requests() > 2 * 12  # a question and an answer each, plus the retries
    pd.testing.assert_frame_equal(conversations, reference[0])
    pd.testing.assert_frame_equal(targets, reference[1])


def test_a_failing_server_is_named_and_finished_batches_are_kept(
    tiny_model_dir, teacher, reference, tmp_path
):
    with _teacher(tiny_model_dir, fail_after=8) as failing:
        study = _study(tiny_model_dir, failing.base_url, max_concurrency=1, max_retries=1)
        with pytest.raises(BackendError) as error:
            run_self_study(study, CHUNKS, tmp_path, "s")
    message = str(error.value)
    assert failing.base_url in message and "HTTP 503" in message and "after 1 retries" in message
    assert "Self-study batch 2" in message and "rerun to resume" in message
    assert len(list(tmp_path.glob("*/conversations-*.parquet"))) == 2  # 4 requests a batch
    conversations, targets = _tables(_study(tiny_model_dir, teacher.base_url), tmp_path)
    pd.testing.assert_frame_equal(conversations, reference[0])
    pd.testing.assert_frame_equal(targets, reference[1])


def test_a_client_error_is_not_retried(tiny_model_dir, tmp_path):
    with _teacher(tiny_model_dir, fail_every=1, fail_with="400") as refusing:
        study = _study(tiny_model_dir, refusing.base_url, max_retries=3)
        with pytest.raises(
            BackendError, match=r"answered HTTP 400 \(not retried\): .*stand-in failure"
        ):
            run_self_study(study, CHUNKS, tmp_path, "s")
        # 4 batches of 2 rows in flight, each row's request sent once: 400 is not transient.
        assert refusing.requests() <= 8


def test_sigkill_with_batches_finishing_out_of_order_loses_and_repeats_nothing(
    tiny_model_dir, tmp_path
):
    root = Path(__file__).resolve().parents[2]
    with _teacher(tiny_model_dir, slow_marker="SLOW", slow_delay_ms=3000) as teacher:
        expected = stream_worker.study(str(tiny_model_dir), teacher.base_url)
        conversations, targets, _ = run_self_study(
            expected, stream_worker.CHUNKS, tmp_path / "ref", "s"
        )
        reference = conversations.to_pandas(), targets.to_pandas()
        shards, output = tmp_path / "shards", tmp_path / "out"
        command = [
            sys.executable,
            "-m",
            "tests.synthesis.stream_worker",
            str(tiny_model_dir),
            teacher.base_url,
            str(shards),
            str(output),
        ]
        process = subprocess.Popen(command, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while time.time() < deadline and len(list(shards.glob("*/conversations-*"))) < 6:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done = sorted(int(p.stem.split("-")[1]) for p in shards.glob("*/conversations-*"))
        # Batches about the slow chunk were still in flight while later ones were written.
        assert len(done) >= 6 and done != list(range(len(done)))
        assert len(done) < 12 and not Path(f"{output}-conversations.parquet").exists()
        subprocess.run(command, cwd=root, env=os.environ, check=True)
    conversations = pd.read_parquet(f"{output}-conversations.parquet")
    targets = pd.read_parquet(f"{output}-targets.parquet")
    assert conversations["conversation_id"].is_unique and len(conversations) == 24
    pd.testing.assert_frame_equal(conversations, reference[0])
    pd.testing.assert_frame_equal(targets, reference[1])
