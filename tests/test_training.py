"""Distillation training: learning, packing isolation, accumulation, resume, guards."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cartridges.batching import make_batch, pack_rows
from cartridges.initialization import from_cartridge
from cartridges.objective import CartridgeStudent, evaluate_kl
from cartridges.schedule import lr_at
from cartridges.targets import Example
from cartridges.training import TrainConfig, planned_run, train_cartridge
from tests.resume_worker import CONFIG
from tests.training_data import assert_rows_match_alone, setting


@pytest.fixture(scope="module")
def data():
    return setting()


def _train(data, checkpoint_dir=None, on_step=None, **overrides):
    model, _, examples, cartridge = data
    settings = dict(
        learning_rate=0.05, global_batch_size=4, micro_batch_size=4, max_steps=12, warmup_steps=2
    )
    config = TrainConfig(**{**settings, **overrides})
    copy = from_cartridge(cartridge)
    return train_cartridge(
        model,
        copy,
        examples,
        config,
        pad_token_id=0,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
    )


def test_training_lowers_the_kl_to_the_teacher(data):
    model, _, examples, cartridge = data
    before = evaluate_kl(model, cartridge, examples, 8, 0)
    trained, history = _train(data, max_steps=60, learning_rate=0.2)
    after = evaluate_kl(model, trained, examples, 8, 0)
    assert after < 0.7 * before
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(trained.frozen_keys, cartridge.frozen_keys)
    assert [h["lr"] for h in history] == [lr_at(step, 60, 0.2, 2) for step in range(60)]


def test_evaluation_hooks_run_every_eval_every_steps_on_the_current_cartridge(data):
    model, _, examples, cartridge = data
    seen = []
    trained, history = train_cartridge(
        model,
        from_cartridge(cartridge),
        examples,
        TrainConfig(global_batch_size=4, micro_batch_size=4, max_steps=5, eval_every=2),
        pad_token_id=0,
        held_out=examples[:2],
        on_eval=lambda c, step: seen.append((step, c.trainable_keys.detach().clone())),
    )
    assert [step for step, _ in seen] == [2, 4]
    assert [("held_out_kl" in h) for h in history] == [False, True, False, True, False]
    assert not torch.equal(seen[0][1], seen[1][1])  # the cartridge as trained so far
    assert not torch.equal(seen[1][1], trained.trainable_keys)


def test_packed_rows_never_attend_across_conversations(data):
    model, _, examples, cartridge = data
    rows = [[0, 1, 2], [3, 4]]
    packed = make_batch(examples, rows, 0, cartridge.num_tokens, model.dtype, pack_length=40)
    assert_rows_match_alone(model, cartridge, examples, rows, packed)
    padded = make_batch(
        examples, [[i] for i in (0, 1, 2, 3, 4)], 0, cartridge.num_tokens, model.dtype
    )
    student = CartridgeStudent(model, cartridge)
    assert torch.allclose(student.loss_sum(packed), student.loss_sum(padded), atol=1e-5)


def test_packing_accumulation_and_loss_chunks_do_not_change_the_result(data):
    reference, _ = _train(data, loss_chunk_size=0)
    accumulated, _ = _train(data, micro_batch_size=2, loss_chunk_size=0)
    chunked, _ = _train(data, loss_chunk_size=5)  # head and loss five targets at a time
    packed, _ = _train(data, pack_length=32)
    assert torch.allclose(accumulated.keys, reference.keys, atol=1e-5)
    assert torch.allclose(chunked.keys, reference.keys, atol=1e-5)
    assert packed.keys.shape == reference.keys.shape  # packing changes the batches, not the model


def test_an_interrupted_run_resumes_to_the_same_cartridge(data, tmp_path):
    reference, _ = _train(data)

    def crash(metrics, step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(data, checkpoint_dir=tmp_path, on_step=crash, checkpoint_every=3)
    (state,) = tmp_path.glob("*/state.pt")
    assert torch.load(state, weights_only=True)["step"] == 6
    resumed, history = _train(data, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert len(history) == 6  # only the remaining steps ran
    assert torch.allclose(resumed.keys, reference.keys, atol=1e-6)


def test_a_non_finite_loss_stops_with_the_step_and_last_checkpoint(data, tmp_path):
    model, _, examples, cartridge = data
    poisoned = list(examples)
    bad = poisoned[0]
    poisoned[0] = type(bad)(
        bad.token_ids,
        bad.positions,
        bad.teacher_ids,
        torch.full_like(bad.teacher_logprobs, math.nan),
    )
    config = TrainConfig(global_batch_size=24, micro_batch_size=24, max_steps=2, checkpoint_every=1)
    with pytest.raises(
        FloatingPointError, match=r"at step 0; the trainable tensors were not updated"
    ):
        train_cartridge(
            model, from_cartridge(cartridge), poisoned, config, 0, checkpoint_dir=tmp_path
        )


def test_bad_batch_settings_are_refused():
    with pytest.raises(
        ValueError, match=r"global_batch_size=10 is not divisible by micro_batch_size=4 x 2"
    ):
        TrainConfig(global_batch_size=10, micro_batch_size=4).accumulation_steps(2)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="longer than pack_length=8"):
        pack_rows([4, 12], 8)
    with pytest.raises(ValueError, match="loss_chunk_size must be >= 0, got -1"):
        TrainConfig(loss_chunk_size=-1)


def test_first_fit_packing():
    assert pack_rows([5, 4, 3, 6, 2], 8) == [[0, 2], [1, 4], [3]]


def _first_fit(lengths, row_length):
    """The plain first fit: each example in the first open row with room, else a new row."""
    rows, free = [], []
    for index, length in enumerate(lengths):
        for row, space in enumerate(free):
            if length <= space:
                rows[row].append(index)
                free[row] -= length
                break
        else:
            rows.append([index])
            free.append(row_length - length)
    return rows


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 64, 1000])
@pytest.mark.parametrize("row_length", [16, 600, 2048])
def test_packing_is_exactly_first_fit(count, row_length):
    """The tree that finds the first row with room must pack as the row-by-row scan did (the
    same rows keep a run's data order, and resumes, unchanged)."""
    generator = random.Random(count * 7 + row_length)
    lengths = [generator.randint(1, min(row_length, 600)) for _ in range(count)]
    assert pack_rows(lengths, row_length) == _first_fit(lengths, row_length)


def test_a_run_killed_with_sigkill_resumes_to_the_same_cartridge(data, tmp_path):
    model, _, examples, cartridge = data
    reference, _ = train_cartridge(
        model, from_cartridge(cartridge), examples, TrainConfig(**CONFIG), pad_token_id=0
    )
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "tests.resume_worker",
        str(tmp_path / "ckpt"),
        str(tmp_path / "out.pt"),
    ]
    process = subprocess.Popen(
        [*command, "0.3"], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        states = list((tmp_path / "ckpt").glob("*/state.pt"))
        if states and torch.load(states[0], weights_only=True)["step"] >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out.pt").exists()  # it really died mid-run
    subprocess.run(
        [*command, "0"], cwd=root, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(resumed, reference.keys, atol=1e-6)


def test_the_tokens_a_run_trains_on_are_every_step_of_every_epoch():
    examples = [
        Example(
            torch.arange(n),
            torch.arange(1, n),
            torch.zeros(n - 1, 1, dtype=torch.long),
            torch.zeros(n - 1, 1),
        )
        for n in (5, 7, 9, 11)
    ]
    config = TrainConfig(epochs=3, max_steps=None, global_batch_size=2, micro_batch_size=2)
    assert planned_run(config, examples)[1] == 3 * (5 + 7 + 9 + 11)
