"""Strict parameters: one typed model per block, checked before a run loads anything."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from cartridges.params import (
    DistillTrainingParams,
    ParameterError,
    SelfStudyParams,
    parse,
    validate_parameters,
)
from cartridges.serving import cli
from cartridges.synthesis.self_study import SelfStudyConfig
from cartridges.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- messages
def test_an_unknown_key_names_the_full_key_and_the_closest_valid_one():
    with pytest.raises(ParameterError) as error:
        validate_parameters({"distill_training": {"num_cartridge_token": 8}})
    assert str(error.value) == (
        "Unknown parameter 'distill_training.num_cartridge_token'; "
        "did you mean 'num_cartridge_tokens'?"
    )


def test_a_nested_unknown_key_is_named_with_its_whole_path():
    with pytest.raises(
        ParameterError,
        match=r"^Unknown parameter 'distill_training\.train\.learnign_rate'; "
        r"did you mean 'learning_rate'\?$",
    ):
        validate_parameters({"distill_training": {"train": {"learnign_rate": 0.1}}})


def test_a_key_with_no_close_match_lists_the_valid_keys():
    with pytest.raises(ParameterError) as error:
        validate_parameters({"model": {"name_or_path": "m", "zzz": 1}})
    assert str(error.value) == (
        "Unknown parameter 'model.zzz'; valid keys: chat_template_kwargs, device, dtype, "
        "name_or_path."
    )


def test_a_misspelt_block_is_refused_with_the_closest_block():
    with pytest.raises(ParameterError, match=r"'distill_trainig'; did you mean 'distill_training'"):
        validate_parameters({"distill_trainig": {"num_cartridge_tokens": 8}})


def test_a_wrong_type_or_range_names_the_key_and_the_value():
    with pytest.raises(ParameterError) as error:
        validate_parameters({"evaluation": {"batch_size": 2.5}})
    assert str(error.value).startswith("Invalid parameter 'evaluation.batch_size' = 2.5: ")
    with pytest.raises(ParameterError) as error:
        validate_parameters({"distill_training": {"held_out_fraction": 1.5}})
    assert str(error.value) == (
        "Invalid parameter 'distill_training.held_out_fraction' = 1.5: Input should be less than 1."
    )
    with pytest.raises(ParameterError, match=r"'distill_training.min_teacher_confidence' = 1: "):
        validate_parameters({"distill_training": {"min_teacher_confidence": 1}})
    # A library config's own check across fields names the block and the value.
    with pytest.raises(ParameterError) as error:
        validate_parameters({"distill_training": {"train": {"learning_rate": 0}}})
    assert str(error.value) == (
        "Invalid parameter 'distill_training.train': learning_rate must be > 0, got 0.0."
    )


def test_every_bad_value_of_one_block_is_reported_not_only_the_first():
    with pytest.raises(ParameterError) as error:
        validate_parameters({"self_study": {"num_conversations": -5, "top_k": -1}})
    assert error.value.problems == [
        "Invalid parameter 'self_study': num_conversations must be >= 1, got -5.",
        "Invalid parameter 'self_study': top_k must be >= 1, got -1.",
    ]
    with pytest.raises(ParameterError) as error:
        validate_parameters(
            {"distill_training": {"train": {"learning_rate": -1, "micro_batch_size": 0}}}
        )
    assert len(error.value.problems) == 2


def test_zero_training_steps_is_refused_not_read_as_unset():
    with pytest.raises(ParameterError) as error:
        validate_parameters({"distill_training": {"train": {"max_steps": 0}}})
    assert error.value.problems == [
        "Invalid parameter 'distill_training.train': max_steps must be null (train for "
        "`epochs`) or >= 1, got 0."
    ]
    validate_parameters({"distill_training": {"train": {"max_steps": None}}})


def test_every_error_of_a_run_comes_in_one_message():
    with pytest.raises(ParameterError) as error:
        validate_parameters(
            {
                "model": {"name_or_path": "m", "dtype": "float64x"},
                "system_prompt": "no slot",
                "evaluation": {"include_swep": False},
                "self_study": {"backend": "vllm", "openai": {"max_concurency": 8}},
            }
        )
    assert error.value.problems == [
        "Unknown parameter 'evaluation.include_swep'; did you mean 'include_sweep'?",
        "Invalid parameter 'model.dtype' = 'float64x': Unknown dtype 'float64x'; expected one "
        "of ['bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32'].",
        "Invalid parameter 'self_study.backend' = 'vllm': Input should be 'local' or 'openai'.",
        "Unknown parameter 'self_study.openai.max_concurency'; did you mean 'max_concurrency'?",
        "Invalid parameter 'system_prompt' = 'no slot': the system prompt must contain "
        "'{chunk}' where the context goes.",
    ]
    assert str(error.value).startswith("5 parameter errors:\n  - Unknown parameter")


@pytest.mark.parametrize(
    ("block", "value", "message"),
    [
        ("model", {}, "Missing parameter 'model.name_or_path'."),
        (
            "distill_training",
            3,
            "Invalid parameter 'distill_training' = 3: Input should be a dictionary or an "
            "instance of DistillTrainingParams.",
        ),
        (
            "distill_training",
            {"objective": "poetry"},
            "Invalid parameter 'distill_training.objective' = 'poetry': Unknown objective "
            "'poetry'; use one of ['distillation', 'cross_entropy', 'memorization'].",
        ),
        (
            "self_study",
            {"system_prompt": "{chunk}"},
            "Invalid parameter 'self_study.system_prompt' = '{chunk}': set the top-level "
            "`system_prompt` parameter; self-study reads it there.",
        ),
        (
            "document_prep",
            {"include": "*.md"},
            "Invalid parameter 'document_prep.include' = '*.md': `include` must be a list of "
            "strings, got '*.md'.",
        ),
        (
            "toy_world",
            {"curriculum": [4, "many"]},
            "Invalid parameter 'toy_world.curriculum.1' = 'many': Input should be a valid "
            "integer, unable to parse string as an integer.",
        ),
        (
            "lora_baseline",
            {"train": {"learnign_rate": 0.001}},
            "Unknown parameter 'lora_baseline.train.learnign_rate'; did you mean 'learning_rate'?",
        ),
        (  # passed the check and failed when the backend was built, with its own message
            "self_study",
            {"backend": "openai", "openai": {"base_urls": []}},
            "Invalid parameter 'self_study.openai.base_urls' = []: List should have at least 1 "
            "item after validation, not 0.",
        ),
        ("serving", {"prot": 80}, "Unknown parameter 'serving.prot'; did you mean 'port'?"),
        (
            "serving",
            {"max_tokens": 8, "default_max_tokens": 16},
            "Invalid parameter 'serving': serving.default_max_tokens (16) exceeds "
            "serving.max_tokens (8).",
        ),
    ],
)
def test_each_block_reports_its_problem(block, value, message):
    with pytest.raises(ParameterError) as error:
        validate_parameters({block: value})
    assert str(error.value) == message


# --------------------------------------------------------------------------- objects
def test_parse_returns_typed_objects_and_accepts_them_again():
    params = parse("distill_training", {"train": {"epochs": 2, "seed": 3}})
    assert isinstance(params, DistillTrainingParams) and isinstance(params.train, TrainConfig)
    assert params.train.epochs == 2.0 and params.train.seed == 3
    assert parse("distill_training", params) is params
    assert params.cartridge_size(100) == 25  # compression 4 by default
    assert params.cartridge_size(100, compression=16) == 6
    assert parse("distill_training", {"num_cartridge_tokens": 7}).cartridge_size(100) == 7


def test_lora_overrides_only_the_keys_it_sets():
    base = TrainConfig(learning_rate=0.02, global_batch_size=4, micro_batch_size=2, seed=5)
    lora = parse("lora_baseline", {"train": {"learning_rate": 0.001}})
    assert lora.train_config(base) == dataclasses.replace(base, learning_rate=0.001)


def test_the_self_study_config_keeps_its_resume_identity():
    params = parse("self_study", {"num_conversations": 8, "backend": "openai"})
    config = params.config("Context: {chunk}")
    assert type(config) is SelfStudyConfig
    expected = SelfStudyConfig(num_conversations=8, system_prompt="Context: {chunk}")
    assert config.resume_identity() == expected.resume_identity()
    assert "backend" not in config.resume_identity()
    assert isinstance(params, SelfStudyParams)


def test_self_study_reads_the_models_switches_and_merges_the_question_writers_over_them():
    params = parse("self_study", {"question_chat_template_kwargs": {"enable_thinking": False}})
    config = params.config("{chunk}", {"enable_thinking": True, "style": "brief"})
    assert config.chat_template_kwargs == {"enable_thinking": True, "style": "brief"}
    assert config.question_template_kwargs == {"enable_thinking": False, "style": "brief"}
    assert params.config("{chunk}").chat_template_kwargs == {}
    with pytest.raises(ParameterError) as error:
        validate_parameters({"self_study": {"chat_template_kwargs": {"enable_thinking": False}}})
    assert str(error.value) == (
        "Invalid parameter 'self_study.chat_template_kwargs': got {'enable_thinking': False}; "
        "set `model.chat_template_kwargs` (the answering bot's, as wherever the model reads a "
        "conversation) or `self_study.question_chat_template_kwargs`."
    )


def test_a_registered_backend_kind_brings_its_choice_and_its_settings_block(monkeypatch):
    """A new kind is its module and a registry entry: the block and the node follow."""
    from pydantic import TypeAdapter
    from pydantic.dataclasses import dataclass as pydantic_dataclass

    from cartridges import params as parameters
    from cartridges.synthesis import registry

    @pydantic_dataclass
    class EchoSettings:
        voice: str = "low"

    built = []
    kind = registry.BackendKind(
        lambda settings, model: built.append((settings, model)), EchoSettings
    )
    backends = {**registry.BACKENDS, "echo": kind}
    monkeypatch.setattr(registry, "BACKENDS", backends)
    block = TypeAdapter(parameters._with_backends(SelfStudyParams, backends))
    params = block.validate_python({"backend": "echo", "echo": {"voice": "high"}})
    assert params.backend_settings == EchoSettings(voice="high")
    registry.build_backend(params.backend, params.backend_settings, "the model block")
    assert built == [(EchoSettings(voice="high"), "the model block")]
    assert parse("self_study", {"backend": "openai"}).backend_settings.max_concurrency == 32
    assert parse("self_study", {}).backend_settings is None  # local: no settings of its own
    with pytest.raises(ValueError, match=r"Unknown self-study backend 'vllm'; use one of"):
        registry.build_backend("vllm", None, "the model block")


def test_library_configs_keep_their_keyword_api_and_refuse_unknown_keywords():
    config = TrainConfig(learning_rate=0.1, epochs=2)
    assert dataclasses.asdict(config)["learning_rate"] == 0.1
    with pytest.raises(ValueError, match="learnign_rate"):
        TrainConfig(learnign_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        TrainConfig(learning_rate=0)


# --------------------------------------------------------------------------- before any load
@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """Any model load, or the runner starting a node, fails the test."""
    import kedro.runner

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded or a node ran before the parameters were checked")

    # Every pipeline module imported first: one first imported while the patch holds would keep
    # the forbidden function it imported by name after the test (and fail a later test).
    import cartridges.pipelines

    for found in pkgutil.walk_packages(cartridges.pipelines.__path__, "cartridges.pipelines."):
        importlib.import_module(found.name)
    for name, module in list(sys.modules.items()):
        if name.startswith("cartridges"):
            for attribute in ("load_model", "load_tokenizer", "pretrain"):
                if callable(getattr(module, attribute, None)):
                    monkeypatch.setattr(module, attribute, forbidden)
    monkeypatch.setattr(kedro.runner.SequentialRunner, "run", forbidden)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


# For each pipeline: one misspelt and one mistyped key of a block its nodes take.
BAD_RUNS = {
    "document_prep": (
        {"document_prep": {"chunking": {"max_token": 64}, "max_file_mb": "big"}},
        [
            "Unknown parameter 'document_prep.chunking.max_token'; did you mean 'max_tokens'?",
            "Invalid parameter 'document_prep.max_file_mb' = 'big'",
        ],
    ),
    "self_study": (
        {"self_study": {"num_conversation": 8, "top_k": "many"}},
        [
            "Unknown parameter 'self_study.num_conversation'; did you mean 'num_conversations'?",
            "Invalid parameter 'self_study.top_k' = 'many'",
        ],
    ),
    "distill_training": (
        {"distill_training": {"num_cartridge_token": 8, "train": {"learning_rate": "fast"}}},
        [
            "Unknown parameter 'distill_training.num_cartridge_token'; did you mean "
            "'num_cartridge_tokens'?",
            "Invalid parameter 'distill_training.train.learning_rate' = 'fast'",
        ],
    ),
    "lora_baseline": (
        {"lora_baseline": {"target_module": ["q_proj"], "train": {"epochs": "two"}}},
        [
            "Unknown parameter 'lora_baseline.target_module'; did you mean 'target_modules'?",
            "Invalid parameter 'lora_baseline.train.epochs' = 'two'",
        ],
    ),
    "evaluation": (
        {"evaluation": {"include_swep": False, "batch_size": 2.5}},
        [
            "Unknown parameter 'evaluation.include_swep'; did you mean 'include_sweep'?",
            "Invalid parameter 'evaluation.batch_size' = 2.5",
        ],
    ),
    "toy_world": (
        {"toy_world": {"step": 3, "lr": "high"}},
        [
            "Unknown parameter 'toy_world.step'; did you mean 'steps'?",
            "Invalid parameter 'toy_world.lr' = 'high'",
        ],
    ),
}


@pytest.mark.parametrize("pipeline", sorted(BAD_RUNS))
def test_each_pipeline_refuses_bad_parameters_before_anything_loads(pipeline, nothing_loads):
    runtime_params, messages = BAD_RUNS[pipeline]
    bootstrap_project(ROOT)
    session = KedroSession.create(project_path=ROOT, runtime_params=runtime_params)
    with session, pytest.raises(ParameterError) as error:
        session.run(pipeline_name=pipeline)
    assert len(error.value.problems) == 2
    for message in messages:
        assert message in str(error.value)


def test_a_block_another_pipeline_takes_is_not_checked(nothing_loads):
    """document_prep runs even though the evaluation block has a typo (it does not use it)."""
    bootstrap_project(ROOT)
    runtime_params = {"evaluation": {"include_swep": False}}
    session = KedroSession.create(project_path=ROOT, runtime_params=runtime_params)
    with session, pytest.raises(AssertionError, match="before the parameters were checked"):
        session.run(pipeline_name="document_prep")


def test_a_node_called_from_python_checks_its_parameters_first(nothing_loads):
    from cartridges.pipelines.distill_training.nodes import initialize_cartridge

    corpus = pd.DataFrame({"text": ["a document"]})
    with pytest.raises(ParameterError, match="did you mean 'num_cartridge_tokens'"):
        initialize_cartridge(corpus, {"num_cartridge_token": 8}, {"name_or_path": "m"}, "{chunk}")


def test_kedro_run_with_a_typo_fails_before_any_node(tmp_path):
    """`kedro run --params` as a user types it, on a copy of the project's code and config."""
    for name in ("conf", "src", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    params = "distill_training.num_cartridge_token=8,distill_training.train.learnign_rate=0.1"
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "-p", "distill_training", "--params", params],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Unknown parameter 'distill_training.num_cartridge_token'" in output
    assert "Unknown parameter 'distill_training.train.learnign_rate'" in output
    assert "Running node" not in output
    assert set(re.findall(r"Loading data from (\S+)", output)) <= {"parameters"}  # no corpus


def test_cartridges_serve_refuses_a_misspelt_serving_key(tmp_path):
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "conf" / "base" / "parameters.yml").write_text(
        "model:\n  name_or_path: m\nserving:\n  prot: 8080\n  max_tokens: many\n"
    )
    with pytest.raises(ParameterError) as error:
        cli.load_project_config(tmp_path)
    assert error.value.problems == [
        "Invalid parameter 'serving.max_tokens' = 'many': Input should be a valid integer, "
        "unable to parse string as an integer.",
        "Unknown parameter 'serving.prot'; did you mean 'port'?",
    ]
