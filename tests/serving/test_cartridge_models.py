"""Cartridges as models: /v1/models lists them with the base model as parent, and ``model``
names one, as vLLM does for LoRA adapters."""

from __future__ import annotations

import json

import pytest
import requests

from tests.serving.conftest import API_KEY, NEW_VERSION, OLD_VERSION, cartridges
from tests.serving.test_completions import QUESTION, ask

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def test_models_lists_the_base_model_then_each_usable_cartridge(client):
    listed = client.models.list().data
    assert (listed[0].id, listed[0].parent) == ("tiny", None)
    assert [m.id for m in listed[1:]] == [
        "cartridge",
        f"cartridge@{NEW_VERSION}",
        f"cartridge@{OLD_VERSION}",
        "doc",
        "other",
        "team/nested",
    ]  # not garbage (no cartridge), foreign (another model), escape (a link out)
    assert {m.parent for m in listed[1:]} == {"tiny"}
    assert all(m.object == "model" and m.created > 0 for m in listed[1:])


def test_model_naming_a_cartridge_answers_with_it(client):
    named = client.chat.completions.create(
        model="doc",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    listed = ask(client, QUESTION, "doc", max_tokens=8)
    assert named.model == "doc" and listed.model == "tiny"
    assert named.choices[0].token_ids == listed.choices[0].token_ids
    assert named.usage.cartridge_tokens == listed.usage.cartridge_tokens > 0


def test_the_model_cartridge_comes_first_then_the_listed_ones(client, server, monkeypatch):
    store, composed = server.server.config.app.state.service.store, []
    get = store.get

    def recording_get(ids):
        composed.append(list(ids))
        return get(ids)

    monkeypatch.setattr(store, "get", recording_get)
    both = client.chat.completions.create(
        model="doc",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body=cartridges("other", "team/nested"),
    )
    assert composed == [["doc", "other", "team/nested"]]
    listed = ask(client, QUESTION, "doc", "other", "team/nested", max_tokens=8)
    assert both.choices[0].token_ids == listed.choices[0].token_ids
    assert both.usage.cartridge_tokens == listed.usage.cartridge_tokens


def test_text_completions_take_a_cartridge_version_as_model(client):
    answer = client.completions.create(
        model=f"cartridge@{OLD_VERSION}", prompt="pump", max_tokens=3, temperature=0
    )
    assert answer.model == f"cartridge@{OLD_VERSION}"
    assert answer.usage.cartridge_tokens == 6


def chat(server, **fields):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, **fields}
    return requests.post(
        f"{server.url}/v1/chat/completions", data=json.dumps(body), headers=AUTH, timeout=30
    )


@pytest.mark.parametrize("model", ["gpt-4o", "no_such_cartridge", "../outside", "/etc/passwd"])
def test_a_model_that_is_neither_the_base_nor_a_cartridge_is_404_naming_it(server, model):
    response = chat(server, model=model)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert f"The model '{model}' does not exist" in error["message"]
    assert "'tiny'" in error["message"] and "/v1/models" in error["message"]


def test_a_model_cartridge_counts_towards_the_limit_and_replaces_the_system_message(server):
    too_many = chat(server, model="doc", cartridges=[{"id": "other"}] * 3)
    assert too_many.status_code == 400
    assert "4 cartridges exceed this server's limit of 3" in too_many.json()["error"]["message"]
    system = [{"role": "system", "content": "Be brief."}, *QUESTION]
    refused = chat(server, model="doc", messages=system)
    assert refused.json()["error"]["code"] == "system_message_with_cartridges"
    escape = chat(server, model="escape")
    assert escape.status_code == 403 and escape.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("model", "code"),
    [("garbage", "cartridge_format_error"), ("foreign", "cartridge_model_mismatch")],
)
def test_an_unusable_model_cartridge_names_model_and_a_listed_one_names_cartridges(
    server, model, code
):
    named_by_model = chat(server, model=model).json()["error"]
    assert (named_by_model["code"], named_by_model["param"]) == (code, "model")
    listed = chat(server, cartridges=[{"id": model}]).json()["error"]
    assert (listed["code"], listed["param"]) == (code, "cartridges")
    after_a_good_model = chat(server, model="doc", cartridges=[{"id": model}]).json()["error"]
    assert (after_a_good_model["code"], after_a_good_model["param"]) == (code, "cartridges")
