"""The served model and what goes with it: tokenizer, cartridge store, batch engine, limits.

One :class:`Service` per app, kept on ``app.state.service``; routes reach it through the
:func:`get_service` dependency. It owns state and loading; it does not check requests
(:mod:`cartridges.serving.validation`) or shape answers (:mod:`cartridges.serving.responses`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, Request
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge
from cartridges.decoding.shared_prefix import UnsupportedModelError
from cartridges.generation import default_stop_ids
from cartridges.modeling import context_length, pad_token_id
from cartridges.serving.config import ServingConfig
from cartridges.serving.engine import ContinuousEngine
from cartridges.serving.errors import ServingError
from cartridges.serving.jobs import Engine
from cartridges.serving.sets import CartridgeSet
from cartridges.serving.static import StaticEngine
from cartridges.serving.store import CacheKey, CartridgeLookupError, CartridgeStore

logger = logging.getLogger(__name__)


class Service:
    """Everything the routes need: model, tokenizer, cartridge store, batch engine, limits.

    Attributes:
        vocab_size: prompt token ids must lie below it.
        max_context: the model's positions (``None`` if its config does not say).
        kv_budget_tokens: the KV budget a request must fit on its own (``None``: none; the
            static scheduler has none).
        reserved_template_names: names a request's ``chat_template_kwargs`` may not set, because
            the chat rendering sets them itself (``apply_chat_template``'s own parameters, the
            template's ``messages`` and the special tokens).
    """

    def __init__(
        self, config: ServingConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.engine = build_engine(config, model, tokenizer)
        self.sets = {
            name: CartridgeSet.open(name, spec) for name, spec in config.cartridge_sets.items()
        }
        self.store = CartridgeStore(
            model,
            config.cartridge_dir,
            config.catalog_datasets,
            config.cartridge_cache_size,
            self.sets,
        )
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context = context_length(model.config)
        self.kv_budget_tokens = (
            config.kv_budget_tokens if self.engine.scheduler == "continuous" else None
        )
        parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
        self.reserved_template_names = frozenset(
            {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
            | {"messages", *tokenizer.special_tokens_map}
        )

    async def cartridge(
        self, cartridge_ids: Sequence[str], first_is_model: bool = False
    ) -> tuple[tuple[CacheKey, ...], Cartridge | None]:
        """The cartridges ``cartridge_ids`` name, composed in order (or none), with their key.

        Loading runs on the model thread: the compatibility check reads the model. A cartridge
        that cannot be used is refused naming the request field that asked for it: ``model``
        for the first one when ``first_is_model``, else ``cartridges``.
        """
        if not cartridge_ids:
            return (), None
        try:
            return await self.engine.run_on_model_thread(self.store.get, list(cartridge_ids))
        except CartridgeLookupError as error:
            param = "model" if first_is_model and error.position == 0 else "cartridges"
            raise ServingError(str(error), error.status, error.code, param) from None

    def template_kwargs(self, requested: dict[str, Any] | None) -> dict[str, Any]:
        """The chat-template switches for a request: its own merged over the configured ones."""
        return {**self.config.chat_template_kwargs, **(requested or {})}


def build_engine(
    config: ServingConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> Engine:
    """The configured scheduler; ``continuous`` falls back to ``static`` for a model it refuses."""
    stop_ids, pad_id = default_stop_ids(model, tokenizer), pad_token_id(tokenizer)
    if config.scheduler == "continuous":
        try:
            return ContinuousEngine(
                model,
                stop_ids,
                pad_id,
                max_batch_size=config.max_batch_size,
                kv_budget_tokens=config.kv_budget_tokens,
            )
        except UnsupportedModelError as error:
            logger.warning("Serving with the static scheduler: %s", error)
    return StaticEngine(
        model,
        stop_ids,
        pad_id,
        max_batch_size=config.max_batch_size,
        batch_wait_ms=config.batch_wait_ms,
    )


def get_service(request: Request) -> Service:
    """The app's :class:`Service` (a FastAPI dependency)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
