"""Evaluation inputs on the tiny model, shared by the library's tests."""

from __future__ import annotations

import pytest

from cartridges.chat import context_ids
from cartridges.evaluation import held_out_conversations, load_questions
from tests.evaluation.data import SYSTEM_TEXT, conversation_tables, write_questions


@pytest.fixture()
def inputs(tiny, tmp_path):
    """The corpus context, the three questions and two held-out conversations."""
    _, tokenizer = tiny
    conversations, targets = conversation_tables(tokenizer)
    return {
        "context": context_ids(tokenizer, SYSTEM_TEXT),
        "questions": load_questions(write_questions(tmp_path / "questions.jsonl")),
        "held_out": held_out_conversations(conversations, targets, None, 8),
    }
