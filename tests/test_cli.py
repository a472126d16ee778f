"""`kedro run --params` with lists and mappings, and a run's settings from `--config FILE`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from cartridges.cli import parse_params
from cartridges.modeling import load_tokenizer
from cartridges_testing.stand_in_teacher import StandInTeacher, TeacherSettings
from tests.test_run import _run, project  # noqa: F401 (project is a fixture)

FLEET = "self_study.openai.base_urls=[http://gpu0:8000/v1,http://gpu1:8000/v1]"


def test_a_list_of_urls_is_one_value_not_split_on_its_commas():
    assert parse_params(f"self_study.backend=openai,{FLEET}") == {
        "self_study": {
            "backend": "openai",
            "openai": {"base_urls": ["http://gpu0:8000/v1", "http://gpu1:8000/v1"]},
        }
    }


def test_values_are_yaml_and_quotes_protect_commas():
    assert parse_params("a=[4, 16],b={c: 1, d: [x,y]},e=0.5,f='one, two',g=\"3\"") == {
        "a": [4, 16],
        "b": {"c": 1, "d": ["x", "y"]},
        "e": 0.5,
        "f": "one, two",
        "g": "3",
    }
    assert parse_params("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a=[1,2", "Unclosed in --params (missing ']')"),
        ("a={b: [1}", "'}' closes nothing"),
        ("a=1]", "']' closes nothing"),
        ("a='x", 'missing "\'"'),
        ("a=1,b", "Item 'b' must be a key and a value separated by '='"),
        ("=3", "Item '=3' has an empty key"),
    ],
)
def test_each_malformed_params_string_is_refused_with_its_reason(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(text)


def _teachers(root):
    tokenizer = str(root / "data" / "06_models" / "toy_world")
    settings = TeacherSettings(
        delay_ms=5,
        answer_tokens=6,
        question_tokens=4,
        vocab_size=len(load_tokenizer(tokenizer)),
        tokenizer=tokenizer,
        pool=8,
    )
    return StandInTeacher(settings), StandInTeacher(settings)


SMALL = "self_study.num_conversations=16,self_study.conversations_per_chunk=4"


def test_the_readme_fleet_command_runs_against_two_teachers(project):  # noqa: F811
    first, second = _teachers(project)
    with first, second:
        urls = f"[{first.base_url},{second.base_url}]"
        result = _run(
            project,
            "run",
            "--pipelines",
            "document_prep,self_study",
            "--params",
            f"{SMALL},self_study.backend=openai,self_study.openai.model=stand-in,"
            f"self_study.openai.base_urls={urls}",
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert first.requests() > 0 and second.requests() > 0


def test_a_runs_settings_come_from_a_config_file_with_nested_lists(project, tmp_path):  # noqa: F811
    first, second = _teachers(project)
    with first, second:
        config = {
            "run": {
                "pipelines": "document_prep,self_study",
                "params": {
                    "self_study": {
                        # not the other test's run, which self-study would resume from its shards
                        "num_conversations": 12,
                        "conversations_per_chunk": 3,
                        "backend": "openai",
                        "openai": {
                            "model": "stand-in",
                            "base_urls": [first.base_url, second.base_url],
                        },
                    }
                },
            }
        }
        path = tmp_path / "run.yml"
        path.write_text(yaml.safe_dump(config))
        result = _run(project, "run", "--config", str(path))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert first.requests() > 0 and second.requests() > 0


def test_the_run_script_uses_the_same_run_command(project):  # noqa: F811
    """`python -m cartridges` (scripts/run.sh) finds `run` at the top of cartridges.cli."""
    result = subprocess.run(
        [sys.executable, "-m", "cartridges", "--help"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "values are YAML, so lists and mappings work" in " ".join(result.stdout.split())
