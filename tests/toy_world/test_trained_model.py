"""The committed trained toy model reads its context: high accuracy with it, chance without."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cartridges.generation import generate
from cartridges.toy_world import ToyWorldForCausalLM, conversations, language, registry
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
    with_ctx, no_ctx = heldout_items(
        50, n_facts=32, seed=2024, template=language.HELDOUT_TEMPLATES[0]
    )
    icl = sum(exact_match(model, tokenizer, with_ctx)) / len(with_ctx)
    none = sum(exact_match(model, tokenizer, no_ctx)) / len(no_ctx)
    assert icl >= 0.9, icl
    assert none <= 0.1, none


def test_generated_answer_and_self_study_question(trained):
    """Greedy ``generate`` answers a held-out question; the ``question`` seed gets a question."""
    model, tokenizer = trained
    doc = registry.make_registry(random.Random(99), 32)
    name, item = doc.facts[7]
    system = {"role": "system", "content": doc.text}
    torch.manual_seed(0)
    replies = generate_replies(
        model,
        tokenizer,
        [
            [
                system,
                {"role": "user", "content": registry.question(name, language.HELDOUT_TEMPLATES[0])},
            ],
            [system, {"role": "user", "content": language.SEED_PROMPTS["question"][0]}],
        ],
    )
    assert replies[0] == registry.answer(name, item)
    asked = [n for n in conversations.mentioned_names(replies[1]) if n in dict(doc.facts)]
    assert asked and replies[1] in {registry.question(asked[0], t) for t in language.ASK_TEMPLATES}


def test_generate_ends_the_reply_at_end_of_sequence_by_default(trained):
    """``generate`` stops at ``<end>`` (the model's eos) without being given stop ids."""
    model, tokenizer = trained
    doc = registry.make_registry(random.Random(99), 32)
    name, item = doc.facts[7]
    messages = [
        {"role": "system", "content": doc.text},
        {"role": "user", "content": registry.question(name, language.HELDOUT_TEMPLATES[0])},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    (reply,) = generate(model, [prompt], max_new_tokens=24)
    assert reply.stopped and reply.token_ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    assert text == registry.answer(name, item)


def test_the_multi_document_model_reads_a_corpus_of_four_documents_in_context():
    """The default model was trained on one registry per context and loses records when four
    towns share it (0.59 exact match); its multi-document fine-tune reads them all. Its config
    declares a context of 128 tokens, which ICL, self-study and serving respect, so that the
    multi_document environment's corpus (520 tokens) is longer than the context: read past that
    limit here, the weights show what ICL over the whole corpus would be (the upper bound)."""
    import json

    assert (
        json.loads((MODEL_DIR.parent / "toy_world_multidoc/config.json").read_text())[
            "max_position_embeddings"
        ]
        == 128
    )
    from cartridges.context import join_documents
    from cartridges.toy_world.evaluate import QAItem

    directory = MODEL_DIR.parent / "toy_world_multidoc"
    if not (directory / "config.json").exists():
        pytest.skip(f"no trained toy model at {directory}")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rng = random.Random(5)
    documents = [registry.make_registry(rng, 32, doc_id=f"t{k}", town=k) for k in range(4)]
    text = join_documents([document.text for document in documents])
    items = [
        QAItem(text, qa.question, qa.answer)
        for document in documents
        for qa in registry.heldout_questions(document, rng, n=16)
    ]
    accuracy = sum(exact_match(model, tokenizer, items)) / len(items)
    assert accuracy >= 0.95, accuracy
