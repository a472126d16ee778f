"""The project's configuration: the default (embedded model) and the `llm` environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from cartridges.synthesis.self_study import SelfStudyConfig
from cartridges.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _params(env: str | None) -> dict:
    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env=env) as session:
        return session.load_context().params


@pytest.mark.parametrize("env", [None, "llm"])
def test_every_environment_gives_valid_settings(env):
    params = _params(env)
    TrainConfig(**params["distill_training"]["train"])
    self_study = {
        k: v for k, v in params["self_study"].items() if k not in ("backend", "openai", "shard_dir")
    }
    SelfStudyConfig(**self_study, system_prompt=params["system_prompt"])


def test_the_llm_environment_overrides_single_keys():
    base, llm = _params(None), _params("llm")
    assert llm["model"]["dtype"] == "bfloat16"
    assert llm["distill_training"]["train"]["pack_length"] == 2048
    # soft merge: keys the environment does not name keep their base values
    assert (
        llm["distill_training"]["num_frozen_tokens"]
        == base["distill_training"]["num_frozen_tokens"]
    )
    assert llm["self_study"]["extra_seed_prompts"] is None
