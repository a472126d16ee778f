"""The openai backend against a real vLLM server, compared with the local backend.

Both serve the same weights (the tiny Llama with head size 32 of ``scripts/vllm_teacher.py``):
tokenization, greedy token ids, top-k ids and log-probabilities, and a whole self-study run
must agree. Needs the vLLM venv (``python scripts/vllm_teacher.py setup``); without it the
module is skipped, unless ``CARTRIDGES_REQUIRE_VLLM=1`` makes that a failure (CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cartridges.chat import chat_ids
from cartridges.modeling import load_model
from cartridges.synthesis.local_backend import LocalBackend
from cartridges.synthesis.openai_backend import PROBE_TEXT, BackendError, OpenAIBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from tests.conftest import CORPUS

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-llama"
# vLLM's CPU kernels sum in another order than the local forward: its top-20 log-probabilities
# differ by up to ~3e-5 here (measured). Entries whose log-probabilities are that close may also
# trade places in the top-k, so ids are compared exactly except within such near-ties.
LOGPROB_TOLERANCE = 2e-4
TEXTS = [PROBE_TEXT, CORPUS, "  leading spaces, tabs\tand\nnewlines; ünïcödé ✓ 日本語"]
MESSAGES = [
    {"role": "system", "content": f"About:\n{CORPUS}"},
    {"role": "user", "content": "Which alarm signals a seal leak?"},
]
CHUNKS = [("chunk-a", CORPUS), ("chunk-b", "Mira Okafor replaced the seal of pump P2 in March.")]
SETTINGS = dict(
    num_conversations=6,
    conversations_per_chunk=3,
    max_question_tokens=12,
    max_answer_tokens=24,
    top_k=20,
    question_temperature=0.0,  # both bots greedy: the two backends must agree exactly
    system_prompt="About:\n{chunk}",
)


def _load_script():
    spec = importlib.util.spec_from_file_location("vllm_teacher", ROOT / "scripts/vllm_teacher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vllm_teacher = _load_script()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """``(server, model_dir)``: vLLM serving the head-32 tiny Llama, once per module."""
    if not vllm_teacher.venv_ready():
        reason = (
            f"no vLLM venv at {vllm_teacher.VENV}: run `python scripts/vllm_teacher.py setup` "
            "to install it"
        )
        if os.environ.get("CARTRIDGES_REQUIRE_VLLM") == "1":
            pytest.fail(f"CARTRIDGES_REQUIRE_VLLM=1 but {reason}.")
        pytest.skip(f"{reason} (CARTRIDGES_REQUIRE_VLLM=1 makes this a failure).")
    scratch = tmp_path_factory.mktemp("vllm")
    model_dir = vllm_teacher.build_teacher_model(scratch / "model")
    with vllm_teacher.start_server(model_dir, name=NAME, log_path=scratch / "vllm.log") as server:
        yield server, model_dir


@pytest.fixture(scope="module")
def local(teacher):
    """``(model, tokenizer)`` of the served weights, loaded in-process."""
    return load_model(str(teacher[1]), "float32", "cpu")


def _remote(teacher, tokenizer, model: str = NAME) -> OpenAIBackend:
    return OpenAIBackend(tokenizer, [teacher[0].base_url], model, max_retries=0, timeout_s=120)


def _tokenize(server, **body) -> list[int]:
    request = urllib.request.Request(
        f"{server.root_url}/tokenize",
        data=json.dumps({"model": NAME, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["tokens"]


@pytest.mark.parametrize("special", [False, True])
def test_tokenize_equals_the_hf_tokenizer(teacher, local, special):
    tokenizer = local[1]
    for text in TEXTS:
        expected = tokenizer(text, add_special_tokens=special)["input_ids"]
        assert _tokenize(teacher[0], prompt=text, add_special_tokens=special) == expected


def test_chat_formatted_tokenize_equals_the_hf_template(teacher, local):
    tokenizer = local[1]
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = chat_ids(tokenizer, MESSAGES, True)
    assert _tokenize(teacher[0], prompt=rendered, add_special_tokens=False) == expected
    served = _tokenize(
        teacher[0], messages=MESSAGES, add_generation_prompt=True, add_special_tokens=False
    )
    assert served == expected


def _assert_same_top_k(ids, logprobs, served_ids, served_logprobs) -> None:
    """Equal top-k rows ``[T, K]``: log-probabilities within tolerance, ids up to near-ties."""
    assert served_ids.shape == ids.shape
    assert np.abs(served_logprobs - logprobs).max() < LOGPROB_TOLERANCE
    for row, column in zip(*np.nonzero(served_ids != ids), strict=True):
        values = logprobs[row]
        near = np.abs(values - values[column]) < 2 * LOGPROB_TOLERANCE
        boundary = abs(values[-1] - values[column]) < 2 * LOGPROB_TOLERANCE
        assert near.sum() > 1 or boundary, f"top-k ids differ at position {row}, rank {column}"
        assert boundary or set(served_ids[row][near]) == set(ids[row][near])


def test_greedy_answers_and_top_k_equal_the_local_backend(teacher, local):
    model, tokenizer = local
    system = f"About:\n{CORPUS}"
    conversations = [
        [{"role": "user", "content": "Which alarm signals a seal leak?"}],
        [{"role": "user", "content": "Who built the pump, and when?"}],
        [{"role": "user", "content": "Summarise the maintenance rules."}],
        [{"role": "user", "content": "What does alarm E12 mean?"}],
        [{"role": "user", "content": "How often is the seal replaced?"}],
    ]
    settings = dict(temperature=0.0, max_tokens=12, top_logprobs=20, seed=3)
    expected = LocalBackend(model, tokenizer).complete(system, conversations, **settings)
    served = _remote(teacher, tokenizer).complete(system, conversations, **settings)
    assert {c.stopped for c in expected} == {True, False}  # both endings are compared
    for mine, theirs in zip(expected, served, strict=True):
        assert theirs.token_ids == mine.token_ids
        assert theirs.stopped == mine.stopped
        assert theirs.text == mine.text  # both decode the ids with the student's tokenizer
        _assert_same_top_k(mine.top_ids, mine.top_logprobs, theirs.top_ids, theirs.top_logprobs)


def test_verify_tokenizer_passes_and_quotes_the_server_on_a_wrong_model(teacher, local):
    tokenizer = local[1]
    _remote(teacher, tokenizer).verify_tokenizer()
    with pytest.raises(BackendError) as raised:
        _remote(teacher, tokenizer, model="default").verify_tokenizer()
    assert "answered HTTP 404" in str(raised.value)
    assert "The model `default` does not exist. Valid aliases: tiny-llama." in str(raised.value)


def test_identity_names_the_served_weights(teacher, local):
    tokenizer = local[1]
    backend = _remote(teacher, tokenizer)
    identity = backend.identity()
    assert identity.startswith(f"openai:{NAME}:")
    assert backend.identity() == identity
    with pytest.raises(BackendError, match="does not serve a model named 'default'"):
        _remote(teacher, tokenizer, model="default").identity()


def _top_k_rows(targets: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat targets as ``[positions, k]`` arrays (every position keeps k entries here)."""
    ids, logprobs = targets["token_id"].to_numpy(), targets["logprob"].to_numpy()
    assert len(ids) % k == 0
    return ids.reshape(-1, k), logprobs.reshape(-1, k)


@pytest.mark.parametrize("rounds", [1, 2])
def test_self_study_through_vllm_equals_the_local_backend(teacher, local, tmp_path, rounds):
    model, tokenizer = local
    config = SelfStudyConfig(**SETTINGS, rounds=rounds)
    backends = {"local": LocalBackend(model, tokenizer), "vllm": _remote(teacher, tokenizer)}
    tables = {}
    for name, backend in backends.items():
        conversations, targets, totals = run_self_study(
            SelfStudy(backend, tokenizer, config), CHUNKS, tmp_path / name, name
        )
        tables[name] = conversations.to_pandas(), targets.to_pandas()
        assert totals["conversations"] == SETTINGS["num_conversations"]
    (conversations, targets), (served_conversations, served_targets) = tables.values()
    assert conversations["num_tokens"].sum() > 200  # long enough to mean something
    assert conversations["messages"].map(json.loads).map(len).max() == 2 * rounds
    columns = [c for c in conversations.columns if c != "token_ids"]
    pd.testing.assert_frame_equal(served_conversations[columns], conversations[columns])
    assert served_conversations["token_ids"].map(list).tolist() == (
        conversations["token_ids"].map(list).tolist()
    )
    where = ["conversation_id", "position"]
    pd.testing.assert_frame_equal(served_targets[where], targets[where])
    _assert_same_top_k(
        *_top_k_rows(targets, SETTINGS["top_k"]), *_top_k_rows(served_targets, SETTINGS["top_k"])
    )
