"""Bad input and hostile requests get clear 4xx answers, and the server keeps serving."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from openai import OpenAI

from cartridges.serving import BackgroundServer, create_app
from tests.serving.conftest import API_KEY, cartridges, make_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "hi"}]


def post(server, path, body, headers=AUTH, **kwargs):
    data = json.dumps(body) if isinstance(body, dict | list) else body
    headers = {"Content-Type": "application/json", **headers}
    return requests.post(
        f"{server.url}/v1/{path}", data=data, headers=headers, timeout=30, **kwargs
    )


def chat(server, cartridge_ids=(), **fields):
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, "temperature": 0, **fields}
    if cartridge_ids:
        body["cartridges"] = [{"id": i, "source": "local"} for i in cartridge_ids]
    return post(server, "chat/completions", body)


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture(autouse=True)
def still_serving(server):
    """After every test here, a normal request with a cartridge still works."""
    yield
    response = chat(server, ["doc"])
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key_is_required_on_v1(server):
    missing = requests.get(f"{server.url}/v1/models", timeout=10)
    assert "Missing API key" in error_of(missing, 401)["message"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = post(
        server,
        "chat/completions",
        {"model": "tiny", "messages": USER},
        headers={"Authorization": "Bearer nope"},
    )
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    # unauthenticated requests are refused before their body is even parsed
    assert post(server, "chat/completions", b"{not json", headers={}).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    for path in ("//v1/models", "/v1/../v1/models", "/anything"):
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 401


def test_no_api_key_configured_means_open_access(tiny, tiny_model_dir, cartridge_root):
    app = create_app(make_config(tiny_model_dir, cartridge_root, api_key=None), *tiny)
    with BackgroundServer(app) as open_server:
        client = OpenAI(base_url=open_server.base_url, api_key="anything", max_retries=0)
        answer = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=2, extra_body=cartridges("doc")
        )
        assert answer.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    "cartridge_id",
    [
        "../outside",
        "../outside.safetensors",
        "../../../../etc/passwd",
        "team/../../outside",
        "/etc/passwd",
        "/tmp/outside.safetensors",
        "..",
        ".hidden",
        "team/.hidden",
        "a\\..\\..\\b",
        "%2e%2e/outside",
        "doc\x00.safetensors",
        "~/doc",
        "doc@1",
        "cartridge@../../outside",
        "cartridge@/etc/passwd",
        "cartridge@..",
    ],
)
def test_cartridge_ids_cannot_leave_the_directory(server, cartridge_id):
    error = error_of(chat(server, [cartridge_id]), 400)
    assert error["code"] == "invalid_cartridge_id"
    assert error["param"] == "cartridges"


def test_symlinks_out_of_the_directory_are_refused(server, cartridge_root):
    assert (cartridge_root / "cartridges" / "escape.safetensors").is_symlink()
    for cartridge_id in ("escape", "escape.safetensors"):
        error = error_of(chat(server, [cartridge_id]), 403)
        assert error["code"] == "cartridge_forbidden"
        assert "outside the cartridge directory" in error["message"]
        assert str(cartridge_root) not in error["message"]  # no server paths leak


def test_missing_and_unreadable_cartridges(server):
    assert error_of(chat(server, ["no_such_cartridge"]), 404)["code"] == "cartridge_not_found"
    assert error_of(chat(server, ["cartridge@2020-01-01T00.00.00.000Z"]), 404)["code"] == (
        "cartridge_not_found"
    )
    error = error_of(chat(server, ["garbage"]), 400)
    assert error["code"] == "cartridge_format_error"
    assert "garbage.safetensors" in error["message"]


def test_a_cartridge_for_another_model_is_refused_naming_both(
    server, tiny_model_dir, cartridge_root
):
    error = error_of(chat(server, ["foreign"]), 400)
    assert error["code"] == "cartridge_model_mismatch"
    assert "foreign_model" in error["message"]  # the cartridge's model
    assert str(tiny_model_dir) in error["message"]  # the served model
    assert "fingerprint" in error["message"]
    composed = error_of(chat(server, ["doc", "foreign"]), 400)
    assert composed["code"] == "cartridge_model_mismatch"


def test_unsupported_source_and_too_many_cartridges(server):
    body = {"model": "tiny", "messages": USER, "cartridges": [{"id": "doc", "source": "wandb"}]}
    error = error_of(post(server, "chat/completions", body), 400)
    assert error["code"] == "unsupported_cartridge_source" and "'wandb'" in error["message"]
    error = error_of(chat(server, ["doc"] * 4), 400)
    assert "4 cartridges exceed this server's limit of 3" in error["message"]


def test_limits_on_tokens_messages_logprobs_and_choices(server):
    error = error_of(chat(server, max_tokens=33), 400)
    assert error["message"] == "max_tokens=33 exceeds this server's limit of 32."
    assert error["param"] == "max_tokens"
    assert "limit of 32" in error_of(chat(server, max_completion_tokens=1000), 400)["message"]
    many = [{"role": "user", "content": str(i)} for i in range(7)]
    error = error_of(chat(server, messages=many), 400)
    assert error["message"] == "7 messages exceed this server's limit of 6."
    error = error_of(chat(server, logprobs=True, top_logprobs=6), 400)
    assert "top_logprobs=6 exceeds this server's limit of 5" in error["message"]
    assert "n=5 exceeds" in error_of(chat(server, n=5), 400)["message"]
    assert "top_p" in error_of(chat(server, top_p=0.5), 400)["message"]
    assert error_of(chat(server, max_tokens=0), 422)["param"] == "max_tokens"
    completion = post(server, "completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9})
    assert "exceeds this server's limit of 32" in error_of(completion, 400)["message"]


def test_request_body_size_is_limited(server):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]}
    error = error_of(post(server, "chat/completions", big), 413)
    assert error["message"] == "Request body exceeds this server's limit of 16384 bytes."

    def chunked():  # no Content-Length: counted while it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}]}'

    assert post(server, "chat/completions", chunked()).status_code == 413


def test_context_length_and_token_ids_are_checked(server):
    too_long = post(
        server, "completions", {"model": "tiny", "prompt": [5] * 4080, "max_tokens": 32}
    )
    error = error_of(too_long, 400)
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]
    bad_ids = post(server, "completions", {"model": "tiny", "prompt": [5, 10**6]})
    assert "Prompt token ids must lie in" in error_of(bad_ids, 400)["message"]
    empty = post(server, "completions", {"model": "tiny", "prompt": []})
    assert error_of(empty, 400)["param"] == "prompt"
    after = post(
        server, "completions", {"model": "tiny", "prompt": "", "cartridges": [{"id": "doc"}]}
    )
    assert "empty after tokenization" in error_of(after, 400)["message"]


def _one_user_message(extra: bytes) -> bytes:
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], ' + extra + b"}"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"model": "tiny", "messages": [', 400),
        (b"", 422),
        (b"[]", 422),
        (b"null", 422),
        (b'{"model": "tiny"}', 422),
        (b'{"model": "tiny", "messages": "hi"}', 422),
        (b'{"model": "tiny", "messages": []}', 422),
        (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 422),
        (
            _one_user_message(b'"temperature": NaN'),
            422,
        ),
        (
            _one_user_message(b'"max_tokens": "lots"'),
            422,
        ),
        (
            _one_user_message(b'"cartridges": "doc"'),
            422,
        ),
        (
            _one_user_message(b'"cartridges": [{}]'),
            422,
        ),
        ("\udcff".encode("utf-8", "surrogatepass"), 400),
    ],
)
def test_malformed_bodies_get_400_or_422(server, body, status):
    error = error_of(post(server, "chat/completions", body), status)
    assert error["message"].startswith(
        "Malformed JSON body" if status == 400 else "Invalid request"
    )


def test_unknown_model_and_route(server):
    error = error_of(chat(server, model="gpt-4o"), 404)
    assert error["code"] == "model_not_found" and "'tiny'" in error["message"]
    assert requests.get(f"{server.url}/v1/nothing", headers=AUTH, timeout=10).status_code == 404


def test_loaded_cartridges_live_in_a_bounded_lru_cache(server):
    store = server.server.config.app.state.service.store
    for cartridge_id in ("doc", "other", "team/nested", "cartridge", "doc"):
        assert chat(server, [cartridge_id]).status_code == 200
    assert len(store) <= 4
    loads = store.loads
    assert chat(server, ["doc"]).status_code == 200  # the most recent one is still cached
    assert store.loads == loads
