"""Model loading and KV layout, for any causal LM."""

from __future__ import annotations

import pytest
import torch

from cartridges.modeling import (
    ModelNotFoundError,
    kv_layout,
    load_model,
    model_fingerprint,
    resolve_dtype,
)
from tests.architectures import ARCHITECTURES, build_model


def test_an_unresolvable_name_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local directory.*huggingface-cli download"):
        load_model("no-such-org/no-such-model-xyz")


def test_a_local_directory_without_a_model_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Could not load a model from local path"):
        load_model(str(tmp_path))


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="Unknown dtype 'float64x'"):
        resolve_dtype("float64x")


def test_loaded_model_is_frozen_in_eval_mode(tiny):
    model, tokenizer = tiny
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template


def test_fingerprint_survives_a_dtype_change(tiny_model_dir):
    float32, _ = load_model(str(tiny_model_dir), "float32", "cpu")
    bfloat16, _ = load_model(str(tiny_model_dir), "bfloat16", "cpu")
    assert bfloat16.dtype == torch.bfloat16
    assert model_fingerprint(float32) == model_fingerprint(bfloat16)
    assert model_fingerprint(float32) != model_fingerprint(build_model("llama"))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_kv_layout_is_read_from_the_model(architecture):
    model = build_model(architecture)
    layout = kv_layout(model)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert (layout.num_layers, layout.num_kv_heads) == (config.num_hidden_layers, heads)
    assert layout.head_dim == 16
    assert layout.bytes_per_token(torch.bfloat16) == 2 * 2 * heads * 16 * 2
