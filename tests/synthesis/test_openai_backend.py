"""The OpenAI-compatible backend against the project's own server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest

from cartridges.modeling import load_model
from cartridges.serving import BackgroundServer, ServingConfig, create_app
from cartridges.synthesis.local_backend import LocalBackend
from cartridges.synthesis.openai_backend import BackendError, OpenAIBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from cartridges_testing.tiny_model import build
from tests.conftest import CORPUS

CHUNKS = [("chunk-a", CORPUS), ("chunk-b", "Mira Okafor replaced the seal of pump P2 in March.")]
SETTINGS = dict(
    num_conversations=6,
    conversations_per_chunk=3,
    max_question_tokens=6,
    max_answer_tokens=6,
    top_k=5,
    question_temperature=0.0,  # both sides greedy: the backends must agree exactly
    system_prompt="About:\n{chunk}",
)


def _serve(model_dir, tmp_path):
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    config = ServingConfig(
        model_name_or_path=str(model_dir),
        served_model_name="tiny",
        device="cpu",
        cartridge_dir=str(tmp_path),
        batch_wait_ms=20,
    )
    return BackgroundServer(create_app(config, model, tokenizer))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with _serve(tiny_model_dir, tmp_path_factory.mktemp("served")) as running:
        yield running


def _backend(tokenizer, url, **overrides) -> OpenAIBackend:
    return OpenAIBackend(
        tokenizer, [url], "tiny", **{"max_retries": 1, "timeout_s": 30, **overrides}
    )


def _tables(result):
    conversations, targets, _ = result
    return conversations.to_pandas(), targets.to_pandas()


def test_openai_backend_reproduces_the_local_backend(tiny, server, tmp_path):
    model, tokenizer = tiny
    config = SelfStudyConfig(**SETTINGS)
    local = _tables(
        run_self_study(
            SelfStudy(LocalBackend(model, tokenizer), tokenizer, config),
            CHUNKS,
            tmp_path / "a",
            "l",
        )
    )
    remote_backend = _backend(tokenizer, server.base_url)
    remote_backend.verify_tokenizer()
    remote = _tables(
        run_self_study(SelfStudy(remote_backend, tokenizer, config), CHUNKS, tmp_path / "b", "r")
    )
    columns = ["conversation_id", "messages", "answer_truncated", "num_tokens"]
    pd.testing.assert_frame_equal(local[0][columns], remote[0][columns])
    assert local[0]["token_ids"].map(list).tolist() == remote[0]["token_ids"].map(list).tolist()
    pd.testing.assert_frame_equal(
        local[1][["conversation_id", "position", "token_id"]],
        remote[1][["conversation_id", "position", "token_id"]],
    )
    assert (local[1]["logprob"] - remote[1]["logprob"]).abs().max() <= 1e-4


def test_several_servers_are_used_round_robin(tiny, server, tiny_model_dir, tmp_path):
    _, tokenizer = tiny
    with _serve(tiny_model_dir, tmp_path) as second:
        backend = OpenAIBackend(tokenizer, [server.base_url, second.base_url], "tiny")
        before = [_requests(s) for s in (server, second)]
        conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
        backend.complete("About: pumps", conversations, temperature=0.0, max_tokens=3)
        after = [_requests(s) for s in (server, second)]
    assert [b - a for a, b in zip(before, after, strict=True)] == [2, 2]


def _requests(server) -> int:
    with urllib.request.urlopen(f"{server.base_url.removesuffix('/v1')}/health") as response:
        return json.loads(response.read())["requests"]


def test_a_server_with_another_tokenizer_is_refused(tiny, tmp_path):
    _, tokenizer = tiny
    other = build(tmp_path / "other", ["zebra quartz " * 50], seed=3)
    with (
        _serve(other, tmp_path) as foreign,
        pytest.raises(BackendError, match="tokenizes differently from the student"),
    ):
        _backend(tokenizer, foreign.base_url).verify_tokenizer()


def test_an_unreachable_server_fails_clearly(tiny):
    _, tokenizer = tiny
    backend = _backend(tokenizer, "http://127.0.0.1:9/v1", timeout_s=2)
    with pytest.raises(BackendError, match="is unreachable"):
        backend.verify_tokenizer()
    with pytest.raises(BackendError, match="unreachable after 1 retries"):
        backend.complete("s", [[{"role": "user", "content": "q"}]], temperature=0.0, max_tokens=2)


class _NoLogprobs(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hello"},
                }
            ],
        }
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_a_response_without_logprobs_is_refused(tiny):
    _, tokenizer = tiny
    httpd = HTTPServer(("127.0.0.1", 0), _NoLogprobs)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = _backend(tokenizer, f"http://127.0.0.1:{httpd.server_port}/v1")
        with pytest.raises(BackendError, match="no logprobs"):
            backend.complete(
                "s", [[{"role": "user", "content": "q"}]], temperature=0.0, max_tokens=2
            )
    finally:
        httpd.shutdown()
