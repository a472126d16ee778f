"""The corpus in context: built once per process for every stage that asks, each given its copy."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from cartridges import context as context_module
from cartridges.chat import context_ids
from cartridges.context import corpus_context, tokenizer_identity
from cartridges.corpus_tables import texts_by_document
from tests.conftest import CORPUS

SYSTEM = "About:\n{chunk}"


@pytest.fixture
def counted(monkeypatch):
    """How many times the chat template tokenised a context."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return context_ids(*args, **kwargs)

    monkeypatch.setattr(context_module, "context_ids", counting)
    monkeypatch.setattr(context_module, "_RECENT", type(context_module._RECENT)())
    return calls


def test_each_stages_copy_of_the_tokenizer_gets_the_context_tokenised_once(tiny, counted):
    _, tokenizer = tiny
    first = corpus_context([CORPUS[:80], CORPUS[80:160]], tokenizer, SYSTEM)
    again = corpus_context([CORPUS[:80], CORPUS[80:160]], copy.deepcopy(tokenizer), SYSTEM)
    assert again == first and len(counted) == 1
    assert first.ids == context_ids(tokenizer, first.system_text)
    again.ids.append(0)  # a caller's copy: changing it changes no other caller's
    assert corpus_context([CORPUS[:80], CORPUS[80:160]], tokenizer, SYSTEM) == first


def test_another_text_prompt_template_or_tokenizer_is_tokenised_afresh(tiny, counted):
    _, tokenizer = tiny
    corpus_context([CORPUS[:80]], tokenizer, SYSTEM)
    corpus_context([CORPUS[:81]], tokenizer, SYSTEM)
    corpus_context([CORPUS[:80]], tokenizer, "Read:\n{chunk}")
    corpus_context([CORPUS[:80]], tokenizer, SYSTEM, {"enable_thinking": False})
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    assert tokenizer_identity(other) != tokenizer_identity(tokenizer)
    corpus_context([CORPUS[:80]], other, SYSTEM)
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["cartridgeword"])
    assert tokenizer_identity(extended) != tokenizer_identity(tokenizer)
    assert len(counted) == 5


def test_the_contexts_kept_are_bounded_by_their_tokens(tiny, counted, monkeypatch):
    _, tokenizer = tiny
    monkeypatch.setattr(context_module, "_RECENT_MAX_TOKENS", 1)
    corpus_context([CORPUS[:80]], tokenizer, SYSTEM)
    corpus_context([CORPUS[:90]], tokenizer, SYSTEM)
    assert len(context_module._RECENT) == 1  # the newest, whatever its size
    corpus_context([CORPUS[:80]], tokenizer, SYSTEM)
    assert len(counted) == 3


def test_documents_are_named_by_their_files_and_a_shared_name_is_refused():
    corpus = pd.DataFrame({"source": ["docs/pump.md", "valve.txt"], "text": ["p", "v"]})
    assert texts_by_document(corpus) == {"pump": "p", "valve": "v"}
    shared = pd.DataFrame({"source": ["a/pump.md", "b/pump.txt"], "text": ["p", "q"]})
    with pytest.raises(ValueError, match=r"Documents share a name \['pump'\]"):
        texts_by_document(shared)


def test_a_tokenizer_changed_in_place_gets_a_new_identity(tiny):
    tokenizer = copy.deepcopy(tiny[1])
    before = tokenizer_identity(tokenizer)
    assert tokenizer_identity(tokenizer) == before  # kept for the live tokenizer
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    templated = tokenizer_identity(tokenizer)
    tokenizer.add_tokens(["cartridgeword"])
    assert len({before, templated, tokenizer_identity(tokenizer)}) == 3
