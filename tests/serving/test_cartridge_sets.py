"""Named sets of document cartridges: a request selects from one per question, as evaluation's
routing does, and /v1/models lists the sets with their members."""

from __future__ import annotations

import pytest
import requests
from kedro.io import Version
from openai import OpenAI

from cartridges.datasets import CartridgeSetDataset
from cartridges.initialization import from_text
from cartridges.serving import BackgroundServer, create_app
from cartridges.serving.config import CartridgeSetConfig
from cartridges.serving.sets import CartridgeSet
from tests.serving.conftest import API_KEY, make_config

DOCUMENTS = {
    "alarms": "Alarm E12 means low suction pressure at the inlet of the pump.",
    "pump": "The pump P2 seal was replaced in March by Halvard Industrial.",
    "valves": "Valve V3 is opened at noon and closed at midnight every day.",
}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def set_config(tiny, tmp_path_factory) -> CartridgeSetConfig:
    """Three document cartridges saved as the pipeline saves them (a versioned set), and their
    corpus."""
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("sets")
    dataset = CartridgeSetDataset(str(root / "document_cartridges"), version=Version(None, None))
    dataset.save({name: from_text(model, tokenizer, text) for name, text in DOCUMENTS.items()})
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCUMENTS.items():
        (corpus / f"{name}.txt").write_text(text)
    return CartridgeSetConfig(
        cartridges=str(root / "document_cartridges"), corpus_dir=str(corpus), select=1
    )


@pytest.fixture(scope="module")
def set_server(tiny, tiny_model_dir, cartridge_root, set_config):
    model, tokenizer = tiny
    config = make_config(tiny_model_dir, cartridge_root, cartridge_sets={"plant": set_config})
    with BackgroundServer(create_app(config, model, tokenizer)) as running:
        yield running


@pytest.fixture
def set_client(set_server) -> OpenAI:
    return OpenAI(base_url=set_server.base_url, api_key=API_KEY, max_retries=0)


def _ask(client: OpenAI, question: str, cartridges: list[dict]):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        extra_body={"cartridges": cartridges, "return_token_ids": True},
    )


def test_a_request_gets_the_cartridges_of_the_documents_its_question_is_about(set_client):
    answer = _ask(set_client, "Who replaced the seal of pump P2?", [{"set": "plant"}])
    assert answer.model_extra["cartridges"] == ["plant:pump"]
    same = _ask(set_client, "Who replaced the seal of pump P2?", [{"id": "plant:pump"}])
    assert answer.choices[0].token_ids == same.choices[0].token_ids  # the same KV, by id
    two = _ask(
        set_client, "When is valve V3 opened, and alarm E12?", [{"set": "plant", "select": 2}]
    )
    assert two.model_extra["cartridges"] == ["plant:alarms", "plant:valves"]  # the set's order
    by_ids = _ask(
        set_client,
        "When is valve V3 opened, and alarm E12?",
        [{"id": "plant:alarms"}, {"id": "plant:valves"}],
    )
    assert two.choices[0].token_ids == by_ids.choices[0].token_ids
    assert (
        two.usage.cartridge_tokens == by_ids.usage.cartridge_tokens > answer.usage.cartridge_tokens
    )


def test_a_text_completion_selects_for_its_prompt(set_client):
    answer = set_client.completions.create(
        model="tiny",
        prompt="Valve V3 is opened at",
        max_tokens=2,
        temperature=0,
        extra_body={"cartridges": [{"set": "plant"}]},
    )
    assert answer.model_extra["cartridges"] == ["plant:valves"]


def test_models_lists_each_set_with_its_members(set_client):
    listed = {m.id: m for m in set_client.models.list().data}
    plant = listed["plant"]
    assert plant.object == "cartridge_set" and plant.parent == "tiny"
    assert plant.model_extra["members"] == ["plant:alarms", "plant:pump", "plant:valves"]
    assert plant.model_extra["select"] == 1
    assert {"plant:alarms", "plant:pump", "plant:valves"} <= set(listed)  # usable as models


@pytest.mark.parametrize(
    ("cartridges", "status", "message"),
    [
        ([{"set": "nope"}], 404, "No cartridge set 'nope'"),
        ([{"id": "plant:nope"}], 404, "set 'plant' has no document 'nope'"),
        ([{"set": "plant", "id": "doc"}], 422, "either an 'id' or a 'set'"),
        ([{"id": "doc", "select": 2}], 422, "'select' goes with 'set'"),
        ([{"set": "plant", "select": 0}], 422, "greater than or equal to 1"),
        ([{"set": "plant", "select": 3}, {"id": "doc"}], 400, "4 cartridges exceed"),
    ],
)
def test_a_bad_selection_is_refused_naming_it(set_server, cartridges, status, message):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Which alarm?"}],
        "max_tokens": 2,
        "cartridges": cartridges,
    }
    response = requests.post(
        f"{set_server.base_url}/chat/completions", json=body, headers=AUTH, timeout=60
    )
    assert response.status_code == status, response.text
    assert message in response.text


def test_a_selection_for_several_prompts_at_once_is_refused(set_server):
    body = {"model": "tiny", "prompt": ["a", "b"], "cartridges": [{"set": "plant"}]}
    response = requests.post(
        f"{set_server.base_url}/completions", json=body, headers=AUTH, timeout=60
    )
    assert response.status_code == 400 and "one text prompt" in response.text


def test_a_set_whose_cartridges_have_no_document_in_the_corpus_is_refused_at_start(
    set_config, tmp_path
):
    (tmp_path / "pump.txt").write_text(DOCUMENTS["pump"])
    config = CartridgeSetConfig(cartridges=set_config.cartridges, corpus_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"the cartridges \['alarms', 'valves'\] have no document"):
        CartridgeSet.open("plant", config)
    with pytest.raises(ValueError, match="must be non-empty, without ':'"):
        CartridgeSet.open("a:b", set_config)
    with pytest.raises(ValueError, match="does not exist"):
        CartridgeSet.open("x", CartridgeSetConfig(cartridges=str(tmp_path / "no"), corpus_dir="."))
