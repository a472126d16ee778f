"""The committed trained toy model reads its context: high accuracy with it, chance without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cartridges.toy_world import ToyWorldForCausalLM, world
from cartridges.toy_world.evaluate import exact_match, generate_replies, heldout_items

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "06_models" / "toy_world"


@pytest.fixture(scope="module")
def trained():
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip(f"no trained toy model at {MODEL_DIR}")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert isinstance(model, ToyWorldForCausalLM)
    return model, tokenizer


def test_in_context_vs_no_context(trained):
    model, tokenizer = trained
    with_ctx, no_ctx = heldout_items(50, n_facts=32, seed=2024, template=world.HELDOUT_TEMPLATES[0])
    icl = sum(exact_match(model, tokenizer, with_ctx)) / len(with_ctx)
    none = sum(exact_match(model, tokenizer, no_ctx)) / len(no_ctx)
    assert icl >= 0.9, icl
    assert none <= 0.1, none


def test_generated_answer_and_self_study_question(trained):
    """Greedy ``generate`` answers a held-out question; the ``question`` seed gets a question."""
    model, tokenizer = trained
    doc = world.make_document(__import__("random").Random(99), 32)
    name, item = doc.facts[7]
    system = {"role": "system", "content": doc.text}
    torch.manual_seed(0)
    replies = generate_replies(
        model,
        tokenizer,
        [
            [system, {"role": "user", "content": world.question(name, world.HELDOUT_TEMPLATES[0])}],
            [system, {"role": "user", "content": world.SEED_PROMPTS["question"][0]}],
        ],
    )
    assert replies[0] == world.answer(name, item)
    asked = [n for n in world.mentioned_names(replies[1]) if n in dict(doc.facts)]
    assert asked and replies[1] in {world.question(asked[0], t) for t in world.ASK_TEMPLATES}
