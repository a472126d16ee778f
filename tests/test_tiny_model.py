"""The embedded tiny model is built deterministically, offline, with a working chat template."""

from __future__ import annotations

from pathlib import Path

from cartridges.modeling import load_model
from cartridges_testing.tiny_model import build
from tests.conftest import CORPUS


def test_building_twice_gives_identical_files(tmp_path):
    first = build(tmp_path / "a", [CORPUS])
    second = build(tmp_path / "b", [CORPUS])
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_chat_template_renders_roles_and_generation_prompt(tiny):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "doc"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>doc<|eos|><|user|>hi<|eos|><|assistant|>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids) == text


def test_the_committed_default_model_loads():
    model, tokenizer = load_model(str(Path(__file__).parents[1] / "data/06_models/tiny_llama"))
    assert model.config.model_type == "llama" and tokenizer.chat_template
