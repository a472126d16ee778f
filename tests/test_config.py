"""The project's configuration: the default (embedded model), `llm` and `real` environments."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from pydantic import BaseModel

from cartridges.params import SCHEMAS, parse, validate_parameters

ROOT = Path(__file__).resolve().parents[1]


def _params(env: str | None) -> dict:
    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env=env) as session:
        return session.load_context().params


@pytest.mark.parametrize("env", [None, "llm", "real"])
def test_every_environment_gives_valid_settings(env):
    params = _params(env)
    validated = validate_parameters(params)  # every block, every key: no error
    assert set(validated) == set(SCHEMAS)
    config = validated["self_study"].config(validated["system_prompt"])
    assert config.system_prompt == params["system_prompt"]


# What conf/base sets differently from the code's defaults: the embedded toy-world model's sizes
# and prompts, and where this project keeps its checkpoints. Every other value written in
# conf/base must be the default itself, so that a key left out behaves as documented.
CONF_BASE_SETTINGS = {
    "document_prep.chunking.num_chunks",
    "self_study.num_conversations",
    "self_study.conversations_per_chunk",
    "self_study.seed_type_weights",
    "self_study.extra_seed_prompts",
    "self_study.replace_seed_prompts",
    "self_study.max_question_tokens",
    "self_study.max_answer_tokens",
    "distill_training.train.learning_rate",
    "distill_training.train.global_batch_size",
    "distill_training.train.micro_batch_size",
    "distill_training.train.epochs",
    "distill_training.train.max_steps",
    "distill_training.train.warmup_steps",
    "distill_training.train.checkpoint_every",
    "distill_training.checkpoint_dir",
    "lora_baseline.train.learning_rate",
    "lora_baseline.checkpoint_dir",
    "evaluation.tasks",
    "evaluation.max_new_tokens",
    "evaluation.results_dir",  # like the checkpoint folders: off in the library, on in a run
    "toy_world.steps",
    "toy_world.checkpoint_dir",
}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted key -> value of a validated block, nested configs included."""
    if dataclasses.is_dataclass(value):
        items = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, BaseModel):
        items = dict(value)
    else:
        return {prefix: value}
    return {
        key: v for name, item in items.items() for key, v in _flat(item, f"{prefix}.{name}").items()
    }


def test_conf_base_equals_the_code_defaults_but_for_the_toy_model_settings():
    params = validate_parameters(_params(None))
    differs = set()
    for block, value in params.items():
        if block in ("model", "system_prompt"):  # no default: the project's model
            continue
        default = _flat(parse(block, {}), block)
        differs |= {key for key, v in _flat(value, block).items() if v != default[key]}
    assert differs == CONF_BASE_SETTINGS


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


def test_the_llm_question_writer_does_not_think_and_the_answers_follow_the_model():
    validated = validate_parameters(_params("llm"))
    model = validated["model"]
    config = validated["self_study"].config(validated["system_prompt"], model.chat_template_kwargs)
    assert config.question_template_kwargs["enable_thinking"] is False
    assert config.chat_template_kwargs == model.chat_template_kwargs
