"""Tiny configs of several causal-LM families, built offline, for model-agnostic tests."""

from __future__ import annotations

import torch
import transformers

VOCAB_SIZE = 96

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, intermediate_size=96)


def _llama_like(config_class, **extra):
    return config_class(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )


ARCHITECTURES = {
    "llama": lambda: _llama_like(transformers.LlamaConfig),
    "qwen2": lambda: _llama_like(transformers.Qwen2Config),
    "qwen3": lambda: _llama_like(transformers.Qwen3Config, head_dim=16),
    "mistral": lambda: _llama_like(transformers.MistralConfig, sliding_window=None),
    "gemma2": lambda: _llama_like(
        transformers.Gemma2Config, head_dim=16, sliding_window=64, attn_implementation="eager"
    ),
    "gemma3": lambda: _llama_like(
        transformers.Gemma3TextConfig, head_dim=16, sliding_window=64, attn_implementation="eager"
    ),
    "phi3": lambda: _llama_like(transformers.Phi3Config, pad_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, num_attention_heads=4, max_position_embeddings=256
    ),
    "olmo2": lambda: _llama_like(transformers.Olmo2Config),
}


def build_model(architecture: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised, frozen, float32 model of the given family."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[architecture]()
    for name, value in overrides.items():
        setattr(config, name, value)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model
