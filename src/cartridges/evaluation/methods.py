"""The methods compared: ways of giving a model its corpus, each a KV prefix (or none).

Every method is a prefix followed by the same question tokens, so the comparison differs only in
what the prefix holds and how many bytes it takes: the whole corpus in context (ICL), nothing,
the first p context tokens (truncated ICL at a cartridge's budget), a trained cartridge, or a
composition of cartridges.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from cartridges.cartridge import Cartridge, CartridgeMismatchError, compose
from cartridges.initialization import from_token_ids
from cartridges.modeling import context_length

logger = logging.getLogger(__name__)

KINDS: dict[str, str] = {
    "icl": "ICL (whole corpus)",
    "no_context": "no context",
    "truncated_icl": "truncated ICL",
    "cartridge": "cartridge",
    "composition": "composed cartridges",
}
"""The kinds of method, with their human names (legends, tables)."""


@dataclass
class Method:
    """A way to answer: a KV prefix (``None``: no context) that the question tokens follow.

    Attributes:
        name: report name (``icl``, ``no_context``, ``truncated_icl_p32``, ``cartridge``, ...).
        kind: ``icl``, ``no_context``, ``truncated_icl``, ``cartridge`` or ``composition``.
        prefix: the KV the questions follow.
        context_ids: the tokens an in-context prefix is the KV of (``None`` for a cartridge,
            which is stored, not computed); prefill time counts computing them.
        version: the catalog version of a trained cartridge.
        note: a caveat shown in the report (e.g. the context was cut to fit the model).
    """

    name: str
    kind: str
    prefix: Cartridge | None
    context_ids: list[int] | None = None
    version: str = ""
    note: str = ""

    @property
    def num_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def kv_bytes(self) -> int:
        """Exact KV cache bytes of the prefix: p x layers x (K, V) x kv_heads x head_dim x dtype."""
        return self.prefix.kv_bytes if self.prefix is not None else 0


def context_budget(model: PreTrainedModel, reserve_tokens: int, limit: int | None = None) -> int:
    """How many context tokens fit: the model's positions minus room for questions and answers."""
    limit = limit or context_length(model.config)
    if limit is None:
        raise ValueError(
            f"The config of '{model.name_or_path}' does not say its context length "
            "(max_position_embeddings): set evaluation.max_context_tokens."
        )
    return max(limit - reserve_tokens, 1)


def build_methods(
    model: PreTrainedModel,
    context: Sequence[int],
    cartridges: Mapping[str, Cartridge],
    budget: int,
    versions: Mapping[str, str] | None = None,
    with_composition: bool = True,
) -> list[Method]:
    """ICL, no context, and per cartridge the cartridge and ICL truncated to its size p.

    Args:
        model: the frozen model every prefix is computed with and checked against.
        context: token ids of the system message carrying the whole corpus.
        cartridges: trained cartridges by report name, in the order to report them.
        budget: the most context tokens that fit the model (see :func:`context_budget`); a
            longer ICL context is cut to its first ``budget`` tokens and flagged.
        versions: catalog version of each cartridge, for the report.
        with_composition: with two or more cartridges, also evaluate them composed.

    Raises:
        CartridgeMismatchError: a cartridge was made for another model.
    """
    context, note = list(context), ""
    if len(context) > budget:
        note = f"context truncated from {len(context)} to {budget} tokens to fit the model"
        logger.warning("ICL: %s", note)
        context = context[:budget]
    methods = [
        Method("icl", "icl", _kv(model, context), context, note=note),
        Method("no_context", "no_context", None),
    ]
    for name, cartridge in cartridges.items():
        _check(cartridge, model, name)
    selected = [(name, "cartridge", cartridge, "") for name, cartridge in cartridges.items()]
    versions = dict(versions or {})
    if with_composition and len(cartridges) >= 2:
        composed = compose(list(cartridges.values()))
        if composed.num_tokens <= budget:
            caveat = f"composed of {', '.join(cartridges)}"
            selected.append(("composition", "composition", composed, caveat))
            # The composition's row names the exact versions it is made of.
            versions["composition"] = " + ".join(versions.get(name, "") for name in cartridges)
        else:
            logger.warning("No composition: its %d tokens exceed the budget.", composed.num_tokens)
    for name, kind, cartridge, caveat in selected:
        cartridge = cartridge.to(model.device, model.dtype)
        version = versions.get(name, "")
        methods.append(Method(name, kind, cartridge, version=version, note=caveat))
        p = cartridge.num_tokens
        truncated = f"truncated_icl_p{p}"
        if p > len(context):
            logger.warning("No %s: the context has only %d tokens.", truncated, len(context))
        elif all(m.name != truncated for m in methods):
            prefix = context[:p]
            methods.append(Method(truncated, "truncated_icl", _kv(model, prefix), prefix))
    return methods


def _kv(model: PreTrainedModel, token_ids: list[int]) -> Cartridge:
    return from_token_ids(model, token_ids, num_frozen_tokens=0, initializer="context")


def _check(cartridge: Cartridge, model: PreTrainedModel, name: str) -> None:
    try:
        cartridge.check_compatible(model)
    except CartridgeMismatchError as error:
        raise CartridgeMismatchError(
            f"Refusing to evaluate '{name}' with model '{model.name_or_path}': {error} "
            "Evaluate it with the model it was trained for, or train a cartridge for this one."
        ) from error
