"""Toy world: a synthetic registry world and the tiny model the project trains to read it.

A plugin of the core library, never imported by it: importing this package registers
``ToyWorldConfig``/``ToyWorldForCausalLM`` with the transformers Auto classes, and the package
declares itself in the ``cartridges.models`` entry-point group, so that
:func:`cartridges.modeling.load_model` finds a saved toy model by path like any other model.

Modules: :mod:`~cartridges.toy_world.language` (words and phrasings),
:mod:`~cartridges.toy_world.registry` (registries and questions about them),
:mod:`~cartridges.toy_world.conversations` (self-study behaviour, pretraining conversations),
:mod:`~cartridges.toy_world.example_corpus` (the example corpus on disk),
:mod:`~cartridges.toy_world.tokenizer`, :mod:`~cartridges.toy_world.model`,
:mod:`~cartridges.toy_world.evaluate` and :mod:`~cartridges.toy_world.pretrain`.
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
