"""Toy world: a synthetic registry world and the tiny model the project trains to read it.

Importing this package registers ``ToyWorldConfig``/``ToyWorldForCausalLM`` with the transformers
Auto classes, so ``AutoModelForCausalLM.from_pretrained(local_dir)`` loads a saved toy model.
"""

from cartridges.toy_world.model import PREV_IDS_ATTR, ToyWorldConfig, ToyWorldForCausalLM, register
from cartridges.toy_world.tokenizer import build_tokenizer, segment_start_ids

__all__ = [
    "PREV_IDS_ATTR",
    "ToyWorldConfig",
    "ToyWorldForCausalLM",
    "build_tokenizer",
    "register",
    "segment_start_ids",
]
