"""The FastAPI app: OpenAI-compatible chat and text completions that answer with cartridges.

A request that names cartridges is answered by the model with their KV as prefix, in place of
the system message that would carry the corpus (:func:`cartridges.chat.continuation_ids`); one
that names none is a plain chat. Decoding is batched across requests by the configured
scheduler: :class:`~cartridges.serving.engine.ContinuousEngine` (requests join and leave a
running decode) or :class:`~cartridges.serving.static.StaticEngine`.

This module only assembles the app: the request guard (:mod:`~cartridges.serving.guard`), the
error shapes (:mod:`~cartridges.serving.errors`), the routes (:mod:`~cartridges.serving.routes`)
and the served model with its engine and store (:mod:`~cartridges.serving.service`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.modeling import load_model
from cartridges.serving.config import ServingConfig
from cartridges.serving.errors import add_error_handlers
from cartridges.serving.guard import Guard
from cartridges.serving.routes import router
from cartridges.serving.service import Service

logger = logging.getLogger(__name__)


def create_app(
    config: ServingConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> FastAPI:
    """Build the server for ``config``; pass ``model`` and ``tokenizer`` to skip loading them."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model_name_or_path, config.dtype, config.device)
    service = Service(config, model, tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        logger.info("Serving '%s' (cartridges from %s)", config.model_id, service.store.root)
        yield
        await service.engine.stop()

    app = FastAPI(
        title="cartridges",
        summary="OpenAI-compatible completions that answer with cartridges (trained KV caches).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    add_error_handlers(app)
    app.include_router(router)
    return app
