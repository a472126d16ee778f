"""The openai backend's tokenizer check and served-model identity, against stand-in servers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cartridges.serving import BackgroundServer, ServingConfig, create_app
from cartridges.synthesis.openai_backend import PROBE_TEXT, BackendError, OpenAIBackend

VLLM_MISSING_MODEL = (
    "The model `default` does not exist. Valid aliases: tiny-llama. Use a valid model name."
)


class StandIn:
    """A tiny HTTP server answering fixed ``(status, body)`` per path; bodies may be raw text."""

    def __init__(self, routes: dict[str, tuple[int, object]]) -> None:
        self.routes = routes
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, body = stand_in.routes.get(self.path, (404, {"detail": "Not Found"}))
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _vllm_routes(tokens, **model_fields) -> dict[str, tuple[int, object]]:
    entry = {
        "id": "tiny-llama",
        "object": "model",
        "created": 1764300000,
        "owned_by": "vllm",
        "root": "/models/tiny-llama",
        "parent": None,
        "max_model_len": 4096,
        **model_fields,
    }
    return {
        "/tokenize": (200, {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}),
        "/v1/models": (200, {"object": "list", "data": [entry]}),
    }


@pytest.fixture
def serve():
    """Start stand-in servers; all are closed at the end of the test."""
    started: list[StandIn] = []

    def start(routes: dict[str, tuple[int, object]]) -> StandIn:
        started.append(StandIn(routes))
        return started[-1]

    yield start
    for stand_in in started:
        stand_in.close()


@pytest.fixture(scope="module")
def probe_ids(tiny):
    return tiny[1](PROBE_TEXT, add_special_tokens=False)["input_ids"]


def _backend(tokenizer, *urls: str, model: str = "tiny-llama") -> OpenAIBackend:
    return OpenAIBackend(tokenizer, list(urls), model, max_retries=0, timeout_s=10)


# --------------------------------------------------------------------------- verify_tokenizer
@pytest.mark.parametrize(
    "status, body, quoted",
    [
        # vLLM 0.32's answer for a model it does not serve
        (
            404,
            {"error": {"message": VLLM_MISSING_MODEL, "type": "NotFoundError", "code": 404}},
            VLLM_MISSING_MODEL,
        ),
        # older vLLM and SGLang: the message at the top level
        (404, {"object": "error", "message": "Model default not found"}, "Model default not found"),
        # FastAPI's default for a route the server lacks
        (404, {"detail": "Not Found"}, "Not Found"),
        # not JSON at all
        (500, "upstream crashed", "upstream crashed"),
    ],
)
def test_a_refused_tokenizer_check_quotes_the_server(tiny, serve, status, body, quoted):
    server = serve({"/tokenize": (status, body)})
    with pytest.raises(BackendError) as raised:
        _backend(tiny[1], server.base_url, model="default").verify_tokenizer()
    root = server.base_url.removesuffix("/v1")
    assert str(raised.value).startswith(
        f"Server {server.base_url} answered HTTP {status} to {root}/tokenize for model "
        f"'default': {quoted}. The tokenizer check needs /tokenize for a served model"
    )


def test_the_tokenizer_check_passes_on_the_same_tokens_and_refuses_others(tiny, serve, probe_ids):
    _backend(tiny[1], serve(_vllm_routes(probe_ids)).base_url).verify_tokenizer()
    other = serve(_vllm_routes([7, *probe_ids[1:]]))
    with pytest.raises(BackendError, match="tokenizes differently from the student model's"):
        _backend(tiny[1], other.base_url).verify_tokenizer()


def test_an_unreachable_server_is_named(tiny, serve):
    server = serve({})
    server.close()
    with pytest.raises(BackendError, match=rf"^Server {server.base_url} is unreachable: "):
        _backend(tiny[1], server.base_url).verify_tokenizer()


# --------------------------------------------------------------------------- identity
def test_the_identity_is_stable_and_ignores_what_changes_at_restart(tiny, serve, probe_ids):
    first = _backend(tiny[1], serve(_vllm_routes(probe_ids)).base_url).identity()
    restarted = serve(_vllm_routes(probe_ids, created=1764399999, permission=[{"id": "x"}]))
    assert first.startswith("openai:tiny-llama:")
    assert _backend(tiny[1], restarted.base_url).identity() == first
    assert _backend(tiny[1], restarted.base_url).identity() == first


@pytest.mark.parametrize(
    "change",
    [
        {"root": "/models/another-llama"},  # other weights under the same served name
        {"parent": "/models/tiny-llama"},  # a LoRA adapter served on top
        {"max_model_len": 2048},
        {"tokens": "other"},
    ],
)
def test_the_identity_changes_with_the_served_model(tiny, serve, probe_ids, change):
    before = _backend(tiny[1], serve(_vllm_routes(probe_ids)).base_url).identity()
    change = dict(change)
    tokens = [7, *probe_ids[1:]] if change.pop("tokens", None) else probe_ids
    after = _backend(tiny[1], serve(_vllm_routes(tokens, **change)).base_url).identity()
    assert after != before


def test_the_identity_refuses_a_model_the_server_does_not_serve(tiny, serve, probe_ids):
    server = serve(_vllm_routes(probe_ids))
    with pytest.raises(BackendError) as raised:
        _backend(tiny[1], server.base_url, model="default").identity()
    assert str(raised.value) == (
        f"Server {server.base_url} does not serve a model named 'default' (it serves: "
        "'tiny-llama'). Set self_study.openai.model to one of those."
    )


def test_the_identity_refuses_a_fleet_serving_different_models(tiny, serve, probe_ids):
    one = serve(_vllm_routes(probe_ids))
    two = serve(_vllm_routes(probe_ids, root="/models/another-llama"))
    with pytest.raises(BackendError) as raised:
        _backend(tiny[1], one.base_url, two.base_url).identity()
    message = str(raised.value)
    assert message.startswith(
        f"The servers report different models under the name 'tiny-llama': {one.base_url}: "
    )
    assert f"{two.base_url}: {{'root': '/models/another-llama'" in message
    same = serve(_vllm_routes(probe_ids))
    fleet = _backend(tiny[1], one.base_url, same.base_url).identity()
    assert fleet == _backend(tiny[1], one.base_url).identity()


@pytest.mark.parametrize(
    "models, message",
    [
        ((503, {"error": {"message": "Engine is sleeping"}}), "answered HTTP 503 to "),
        ((200, {"object": "list"}), "without a model list"),
        ((200, "<html>"), "with invalid JSON"),
    ],
)
def test_the_identity_refuses_a_bad_model_list(tiny, serve, probe_ids, models, message):
    server = serve({**_vllm_routes(probe_ids), "/v1/models": models})
    with pytest.raises(BackendError, match=f"^Server {server.base_url} .*{message}"):
        _backend(tiny[1], server.base_url).identity()


def test_the_identity_of_the_projects_own_server(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    config = ServingConfig(
        model_name_or_path=str(tiny_model_dir),
        served_model_name="tiny",
        device="cpu",
        cartridge_dir=str(tmp_path),
    )
    with BackgroundServer(create_app(config, model, tokenizer)) as server:
        backend = _backend(tokenizer, server.base_url, model="tiny")
        backend.verify_tokenizer()
        assert backend.identity() == backend.identity()
        assert backend.identity().startswith("openai:tiny:")
