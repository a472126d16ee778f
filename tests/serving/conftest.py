"""A live server on 127.0.0.1 over the tiny model, and a cartridge directory to serve from."""

from __future__ import annotations

import os

import pytest
from openai import AsyncOpenAI, OpenAI

from cartridges.chat import context_ids
from cartridges.checkpoint import save_cartridge
from cartridges.initialization import from_text, from_token_ids
from cartridges.modeling import load_model
from cartridges.serving import BackgroundServer, ServingConfig, create_app
from cartridges_testing.tiny_model import build
from tests.conftest import CORPUS

API_KEY = "test-secret-key"
SYSTEM_TEXT = f"You are in a conversation about the following information.\n\n{CORPUS}"
OTHER_TEXT = "Halvard Industrial also builds the Borealis BX-9 compressor, serviced yearly."
OLD_VERSION, NEW_VERSION = "2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"
LIMITS = dict(
    max_tokens=32,
    default_max_tokens=8,
    max_messages=6,
    max_body_bytes=16_384,
    max_top_logprobs=5,
    max_n=4,
    max_cartridges=3,
    cartridge_cache_size=4,
    batch_wait_ms=50,
)


@pytest.fixture(scope="session")
def cartridge_root(tiny, tmp_path_factory):
    """``cartridges/`` (the served directory) and ``catalog/`` (a versioned dataset) side by side.

    Files: ``doc`` (the KV of the system message that carries CORPUS), ``other`` and
    ``team/nested`` (prefixes of other texts), ``foreign`` (made for another model),
    ``garbage`` (not a cartridge), ``escape`` (a symlink to a cartridge outside the directory).
    """
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("serving")
    served = root / "cartridges"
    save_cartridge(
        from_token_ids(model, context_ids(tokenizer, SYSTEM_TEXT)), served / "doc.safetensors"
    )
    save_cartridge(from_text(model, tokenizer, OTHER_TEXT), served / "other.safetensors")
    save_cartridge(
        from_text(model, tokenizer, CORPUS, num_tokens=8), served / "team/nested.safetensors"
    )
    (served / "garbage.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    outside = root / "outside.safetensors"
    save_cartridge(from_text(model, tokenizer, CORPUS, num_tokens=4), outside)
    os.symlink(outside, served / "escape.safetensors")
    foreign_model, foreign_tokenizer = load_model(
        str(build(root / "foreign_model", [CORPUS], seed=1)), "float32", "cpu"
    )
    save_cartridge(
        from_text(foreign_model, foreign_tokenizer, CORPUS), served / "foreign.safetensors"
    )
    catalog = root / "catalog" / "cartridge.safetensors"
    for version, num_tokens in ((OLD_VERSION, 6), (NEW_VERSION, 12)):
        cartridge = from_text(model, tokenizer, CORPUS, num_tokens=num_tokens)
        save_cartridge(cartridge, catalog / version / "cartridge.safetensors")
    return root


def make_config(tiny_model_dir, cartridge_root, **overrides) -> ServingConfig:
    settings = dict(
        model_name_or_path=str(tiny_model_dir),
        served_model_name="tiny",
        device="cpu",
        cartridge_dir=str(cartridge_root / "cartridges"),
        catalog_datasets={"cartridge": str(cartridge_root / "catalog" / "cartridge.safetensors")},
        api_key=API_KEY,
        **LIMITS,
    )
    settings.update(overrides)
    return ServingConfig(**settings)


@pytest.fixture(scope="session")
def server(tiny, tiny_model_dir, cartridge_root):
    """The server under test: continuous scheduler, API key on, small limits."""
    model, tokenizer = tiny
    app = create_app(make_config(tiny_model_dir, cartridge_root), model, tokenizer)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="session")
def static_server(tiny, tiny_model_dir, cartridge_root):
    """The same server with the static scheduler (today's grouping into generate calls)."""
    model, tokenizer = tiny
    config = make_config(tiny_model_dir, cartridge_root, scheduler="static")
    with BackgroundServer(create_app(config, model, tokenizer)) as running:
        yield running


@pytest.fixture(params=["continuous", "static"])
def scheduled(request) -> tuple[str, OpenAI]:
    """Each scheduler's server, with a client: ``(scheduler, client)``."""
    fixture = "server" if request.param == "continuous" else "static_server"
    running = request.getfixturevalue(fixture)
    return request.param, OpenAI(base_url=running.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture
def async_client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def cartridges(*ids: str) -> dict:
    """The ``extra_body`` naming ``ids``."""
    return {"cartridges": [{"id": i, "source": "local"} for i in ids], "return_token_ids": True}
