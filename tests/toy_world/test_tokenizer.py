"""Tokenizer: word-level round trip, chat template layout, save/load through AutoTokenizer."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from cartridges.toy_world import language, registry, segment_start_ids
from cartridges.toy_world.tokenizer import build_tokenizer, encode_conversation


def _chat(doc: registry.Registry) -> list[dict[str, str]]:
    name, item = doc.facts[0]
    return [
        {"role": "system", "content": doc.text},
        {"role": "user", "content": registry.question(name, language.ASK_TEMPLATES[0])},
        {"role": "assistant", "content": registry.answer(name, item)},
    ]


def test_deterministic_vocabulary():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_decode_encode_round_trip(tokenizer):
    doc = registry.make_registry(random.Random(0), 6)
    ids = tokenizer.apply_chat_template(_chat(doc), tokenize=True, return_dict=True)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<" not in text and text.split()[:3] == doc.text.split()[:3]
    specials = set(tokenizer.all_special_ids)
    assert tokenizer(text)["input_ids"] == [i for i in ids if i not in specials]
    assert tokenizer.unk_token_id not in ids


def test_chat_template_layout(tokenizer):
    doc = registry.make_registry(random.Random(1), 3)
    msgs = _chat(doc)
    text = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><system> ") and text.endswith("<end> <assistant>")
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    seg = set(segment_start_ids(tokenizer))
    roles = [tokenizer.convert_tokens_to_ids(t) for t in ("<system>", "<user>", "<assistant>")]
    assert [i for i in ids if i in roles] == roles and set(roles) <= seg
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token == "<end>"
    # the fast encoder used for training agrees with the Jinja template
    fast, mask = encode_conversation(tokenizer, msgs)
    assert fast == ids
    answer_ids = [i for i, m in zip(fast, mask, strict=True) if m]
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == msgs[2]["content"]
    gen, _ = encode_conversation(tokenizer, msgs[:2], add_generation_prompt=True)
    assert (
        gen
        == tokenizer.apply_chat_template(
            msgs[:2], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    doc = registry.make_registry(random.Random(2), 4)
    a = tokenizer.apply_chat_template(_chat(doc), tokenize=True, return_dict=True)["input_ids"]
    b = loaded.apply_chat_template(_chat(doc), tokenize=True, return_dict=True)["input_ids"]
    assert a == b
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<end>", "<pad>")
    assert segment_start_ids(loaded) == segment_start_ids(tokenizer)
