"""The frozen model the benchmarks share: a random Llama, 4M parameters by default."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model(vocab: int, hidden_size: int = 256, layers: int = 4) -> LlamaForCausalLM:
    """Big enough that matrix products dominate, small enough to run on a laptop CPU.

    ``hidden_size`` and ``layers`` scale it up for a GPU (heads of 64 dimensions).
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)
