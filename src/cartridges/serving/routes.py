"""The endpoints: health, models, tokenize, chat and text completions, on one ``APIRouter``.

Each handler reads as its steps: check the request, load its cartridges, build the prompt,
check it fits, decode (streamed or whole), shape the answer. The steps live in their own
modules; the handlers only order them.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from cartridges.cartridge import Cartridge
from cartridges.serving.disconnect import unless_disconnected
from cartridges.serving.jobs import Job
from cartridges.serving.prompts import chat_prompt, completion_prompts
from cartridges.serving.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from cartridges.serving.responses import chat_completion, response_head, text_completion
from cartridges.serving.service import Service, ServiceDep
from cartridges.serving.store import CacheKey
from cartridges.serving.streaming import chat_chunks, completion_chunks, event_stream
from cartridges.serving.text import Rendered, render
from cartridges.serving.validation import (
    Checked,
    check_chat,
    check_completion,
    check_context,
    template_kwargs,
)

router = APIRouter()


@router.get("/health")
async def health(service: ServiceDep) -> dict:
    """Liveness, the scheduler, queue depth and batching counters.

    ``batches`` counts ``generate`` calls (static scheduler) or steps (continuous); ``running``
    and ``waiting`` are rows decoding now and requests (static: jobs) waiting to start.
    """
    engine = service.engine
    stats = engine.stats
    return {
        "status": "ok",
        "model": service.config.model_id,
        "scheduler": engine.scheduler,
        "pending": engine.pending,
        "running": engine.running,
        "waiting": engine.pending,
        "cartridges_cached": len(service.store),
        "requests": stats.requests,
        "batches": stats.batches,
        "max_batch_rows": stats.max_batch_rows,
        "generated_tokens": stats.generated_tokens,
    }


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict:
    """The base model, the cartridge sets (``object: cartridge_set``, with their members), then
    every cartridge as a model whose ``parent`` is the base model.

    As vLLM lists LoRA adapters: a client that only knows ``model`` can answer with a cartridge.
    """
    model_id = service.config.model_id
    base = {"id": model_id, "object": "model", "created": 0, "owned_by": "cartridges"}
    available = await asyncio.to_thread(service.store.available)
    cartridges = [
        {
            "id": cartridge.id,
            "object": "model",
            "created": cartridge.created,
            "owned_by": "cartridges",
            "parent": model_id,
        }
        for cartridge in available
        if cartridge.id not in (model_id, service.config.model_name_or_path)
    ]
    sets = [
        {
            "id": name,
            "object": "cartridge_set",
            "created": 0,
            "owned_by": "cartridges",
            "parent": model_id,
            "members": [cartridge_set.member_id(document) for document in cartridge_set.files],
            "select": cartridge_set.default_select,
        }
        for name, cartridge_set in service.sets.items()
    ]
    return {"object": "list", "data": [{**base, "parent": None}, *sets, *cartridges]}


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, service: ServiceDep) -> dict:
    """Token ids of a prompt, as vLLM answers: self-study compares them with its tokenizer."""
    ids = service.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)
    tokens = list(ids["input_ids"])
    return {"count": len(tokens), "max_model_len": service.max_context, "tokens": tokens}


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, service: ServiceDep, http: Request):
    """Chat, optionally with cartridges standing in for the system message."""
    checked = check_chat(service, request)
    switches = template_kwargs(service, request)
    key, cartridge = await service.cartridge(checked.cartridge_ids, checked.model_cartridge)
    prompt = chat_prompt(service.tokenizer, request.messages, cartridge is not None, switches)
    prefix_tokens = cartridge.num_tokens if cartridge is not None else 0
    check_context(service, [prompt], prefix_tokens, checked.max_tokens)
    job = _job(request, checked, [prompt] * request.n, key, cartridge, request.logprobs)
    head = response_head("chatcmpl", checked.model_id, _selection(request, checked))
    if request.stream:
        return event_stream(chat_chunks(service, request, job, head, prompt, prefix_tokens))
    rendered = await _whole_answers(service, request, job, http)
    if rendered is None:
        return _client_left()
    return chat_completion(service.tokenizer, request, head, rendered, prompt, prefix_tokens)


@router.post("/v1/completions")
async def completions(request: CompletionRequest, service: ServiceDep, http: Request):
    """Text completion of a raw prompt (text or token ids) after the cartridges."""
    checked = check_completion(service, request)
    key, cartridge = await service.cartridge(checked.cartridge_ids, checked.model_cartridge)
    prompts = completion_prompts(request.prompt, service.tokenizer, with_bos=cartridge is None)
    prefix_tokens = cartridge.num_tokens if cartridge is not None else 0
    check_context(service, prompts, prefix_tokens, checked.max_tokens)
    rows = [p for p in prompts for _ in range(request.n)]
    job = _job(request, checked, rows, key, cartridge, request.logprobs is not None)
    head = response_head("cmpl", checked.model_id, _selection(request, checked))
    if request.stream:
        return event_stream(completion_chunks(service, request, job, head, prompts, prefix_tokens))
    rendered = await _whole_answers(service, request, job, http)
    if rendered is None:
        return _client_left()
    return text_completion(service.tokenizer, request, head, rendered, prompts, prefix_tokens)


def _selection(
    request: ChatCompletionRequest | CompletionRequest, checked: Checked
) -> list[str] | None:
    """The cartridges the answer was composed from, when a set's retriever chose some."""
    return checked.cartridge_ids if any(ref.set for ref in request.cartridges) else None


def _job(
    request: ChatCompletionRequest | CompletionRequest,
    checked: Checked,
    prompts: list[list[int]],
    key: CacheKey,
    cartridge: Cartridge | None,
    logprobs: bool,
) -> Job:
    """The engine's job for a checked request: one row per prompt and choice."""
    return Job(
        prompts=prompts,
        cartridge_key=key,
        cartridge=cartridge,
        max_tokens=checked.max_tokens,
        temperature=request.temperature,
        seed=request.seed,
        logprobs=logprobs,
        top_logprobs=checked.top_logprobs,
    )


async def _whole_answers(
    service: Service,
    request: ChatCompletionRequest | CompletionRequest,
    job: Job,
    http: Request,
) -> list[Rendered] | None:
    """Decode ``job`` to its end; each row rendered to text with the request's stop strings.

    ``None`` when the client went away first: its requests are then withdrawn from the batch.
    """
    rows = await unless_disconnected(service.engine.submit(job), http)
    if rows is None:
        return None
    return [render(service.tokenizer, row, request.stop_strings()) for row in rows]


def _client_left() -> Response:
    """What a request whose client went away gets (nobody reads it): nginx's 499."""
    return Response(status_code=499)
