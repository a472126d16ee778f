"""Resumable state: restored only by the run it belongs to, and written whole or not at all."""

from __future__ import annotations

import logging

import pytest
import torch

from cartridges.cartridge import Cartridge
from cartridges.initialization import from_cartridge, from_token_ids
from cartridges.objective import CartridgeStudent
from cartridges.train_state import STATE_FILE, load_state, run_key, save_state, saved_state
from cartridges.training import TrainConfig
from tests.training_data import setting


@pytest.fixture(scope="module")
def data():
    return setting()


def _student(data) -> tuple[CartridgeStudent, torch.optim.Optimizer]:
    model, _, _, cartridge = data
    student = CartridgeStudent(model, from_cartridge(cartridge))
    return student, torch.optim.Adam(student.trainable(), lr=0.1)


def test_a_checkpoint_restores_the_tensors_the_optimiser_and_the_step(data, tmp_path):
    student, optimizer = _student(data)
    assert saved_state(tmp_path) is None and saved_state(None) is None
    student.trainable()[0].sum().backward()
    optimizer.step()
    save_state(tmp_path, "key", 7, student, optimizer)
    assert str(saved_state(tmp_path)) == str(tmp_path / STATE_FILE)
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary left behind

    fresh, fresh_optimizer = _student(data)
    assert load_state(tmp_path, "key", fresh, fresh_optimizer) == 7
    for mine, saved in zip(fresh.trainable(), student.trainable(), strict=True):
        assert torch.equal(mine, saved)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_another_runs_checkpoint_is_ignored(data, tmp_path, caplog):
    student, optimizer = _student(data)
    with torch.no_grad():
        student.trainable()[0].add_(1.0)
    save_state(tmp_path, "theirs", 3, student, optimizer)
    fresh, fresh_optimizer = _student(data)
    before = [t.clone() for t in fresh.trainable()]
    with caplog.at_level(logging.WARNING, logger="cartridges.train_state"):
        assert load_state(tmp_path, "mine", fresh, fresh_optimizer) == 0
    assert "belongs to a different run" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.trainable(), before, strict=True))


def test_the_run_key_follows_parameters_initial_tensors_and_data(data):
    model, _, examples, cartridge = data
    student = CartridgeStudent(model, from_cartridge(cartridge))
    base = run_key(TrainConfig(), student, examples)
    assert run_key(TrainConfig(), student, examples) == base
    assert run_key(TrainConfig(seed=1), student, examples) != base
    assert run_key(TrainConfig(), student, examples[1:]) != base
    with torch.no_grad():
        student.trainable()[0].add_(1.0)
    assert run_key(TrainConfig(), student, examples) != base


def test_the_run_key_follows_every_byte_and_the_size_of_the_cartridge(data):
    """A size sweep starts each cartridge from more of the same text, so their leading bytes
    agree; a key made of leading bytes alone let the p = n/4 run resume the n/8 checkpoint."""
    model, _, examples, cartridge = data
    layers, heads, _, head_dim = cartridge.keys.shape
    keys = torch.randn(layers, heads, 4096, head_dim, generator=torch.Generator().manual_seed(0))
    long = CartridgeStudent(model, Cartridge(keys, keys.clone()))
    short = CartridgeStudent(model, Cartridge(keys[:, :, :3072], keys[:, :, :3072].clone()))
    assert run_key(TrainConfig(), short, examples) != run_key(TrainConfig(), long, examples)
    base = run_key(TrainConfig(), long, examples)
    with torch.no_grad():
        long.trainable()[0][-1, -1, -1, -1] += 1.0  # the tensor's last element
    assert run_key(TrainConfig(), long, examples) != base


def test_a_checkpoint_of_other_shapes_is_ignored_not_loaded(data, tmp_path, caplog):
    model, document, _, _ = data
    short = CartridgeStudent(model, from_token_ids(model, document[:12], num_frozen_tokens=1))
    save_state(tmp_path, "key", 5, short, torch.optim.Adam(short.trainable(), lr=0.1))
    long = CartridgeStudent(model, from_token_ids(model, document[:40], num_frozen_tokens=1))
    with caplog.at_level(logging.WARNING, logger="cartridges.train_state"):
        assert load_state(tmp_path, "key", long, torch.optim.Adam(long.trainable(), lr=0.1)) == 0
    assert "shapes" in caplog.text
