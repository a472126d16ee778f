"""Shared fixtures for the toy-world tests: a tiny untrained model and the tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:  # the package is normally installed (or on pytest's pythonpath); fall back to src/
    import cartridges.toy_world  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from cartridges.toy_world import (
    ToyWorldConfig,
    ToyWorldForCausalLM,
    build_tokenizer,
    segment_start_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_model(
    tokenizer, shift_width: int = 3, init_std: float = 0.02, seed: int = 0
) -> ToyWorldForCausalLM:
    """An untrained 2-layer model; a large ``init_std`` gives varied generations."""
    torch.manual_seed(seed)
    config = ToyWorldConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        shift_width=shift_width,
        segment_start_token_ids=segment_start_ids(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        initializer_range=init_std,
    )
    model = ToyWorldForCausalLM(config).eval()
    if init_std > 0.1:  # post_init may reset some weights to the default range: rescale all
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    return model


@pytest.fixture(scope="session")
def make_tiny(tokenizer):
    """Factory: ``make_tiny(shift_width=3, init_std=0.02, seed=0)``."""
    return lambda **kw: tiny_model(tokenizer, **kw)
