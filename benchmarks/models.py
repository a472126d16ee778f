"""The frozen model the benchmarks share: a random 4M-parameter Llama (4 layers, hidden 256)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model(vocab: int) -> LlamaForCausalLM:
    """Big enough that matrix products dominate, small enough to run on a laptop CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)
