"""The FastAPI app: OpenAI-compatible chat and text completions that answer with cartridges.

A request that names cartridges is answered by the model with their KV as prefix, in place of
the system message that would carry the corpus (:func:`cartridges.chat.continuation_ids`); one
that names none is a plain chat. Decoding is batched across requests by
:class:`~cartridges.serving.engine.BatchEngine`.

Streaming sends OpenAI's SSE chunks, one per generated token, as the model decodes them: the
engine hands each step's tokens over while the batch goes on decoding.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import chat_ids, continuation_ids
from cartridges.modeling import load_model
from cartridges.serving.config import ServingConfig
from cartridges.serving.engine import BatchEngine, Job, Row, StreamToken
from cartridges.serving.protocol import (
    BaseCompletionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
)
from cartridges.serving.store import CartridgeLookupError, CartridgeStore

logger = logging.getLogger(__name__)

# Tokens after a cartridge are the chat rendering after the system turn, whatever its text.
_SYSTEM_PLACEHOLDER = "context"


class ServingError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- guard middleware
# Paths answered without the API key; everything else needs it (an allowlist, so that odd
# spellings such as "//v1/models" cannot slip past the check).
_OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class _Guard:
    """API key and body-size checks, before FastAPI reads or parses anything.

    A pure ASGI middleware so that an unauthenticated or oversized request is refused first,
    whatever its body holds; the body is buffered (it is small by then) and replayed.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in _OPEN_PATHS:
            refusal = self._check_key(headers.get("authorization"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_key(self, authorization: str | None) -> JSONResponse | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            return None
        message = (
            "Invalid API key."
            if authorization
            else "Missing API key: send the header 'Authorization: Bearer <key>'."
        )
        return error_response(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            f"Request body exceeds this server's limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )


# --------------------------------------------------------------------------- the served model
@dataclass
class _Rendered:
    """A row ready to send: tokens kept, text pieces per token, and why it ended.

    Streamed, it holds one token, and ``finish_reason`` is ``None`` but on its choice's last.
    """

    token_ids: list[int]
    deltas: list[str]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class _Detokenizer:
    """The text of a growing token sequence, one piece per token, in linear time.

    Each token is decoded in a short window after the text decoded so far, not with the whole
    sequence. The window starts one decoded piece back, so that tokenizers that treat a
    sequence's first token specially (e.g. a leading-space marker) decode the new tokens as they
    do inside the full text, and the pieces join to the full decode. A token that ends inside a
    UTF-8 character (U+FFFD) gives an empty piece until the character is complete.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window = 0  # first id of the decoding window (one decoded piece back)
        self.decoded = 0  # ids decoded into pieces so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int, last: bool = False) -> str:
        """The text that ``token_id`` completes (all that is left when ``last``)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.window : self.decoded])
        after = self._decode(self.ids[self.window :])
        if after.endswith("\ufffd") and not last:
            return ""
        self.window, self.decoded = self.decoded, len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""


class _TextStream:
    """One streamed choice's text, released as soon as no later token can change it.

    Pieces come from a :class:`_Detokenizer`, as :meth:`_Service.render` gets them, so that they
    join to the non-streamed text. A tail that could begin a stop string waits until the string
    is ruled out (then it is sent) or completed (then the text ends before it).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.pieces, self.stops = _Detokenizer(tokenizer), stops
        self.longest = max((len(stop) for stop in stops), default=0)
        self.text = ""  # the decoded text so far, an incomplete last character left out
        self.sent = 0  # characters of it released
        self.finish_reason: str | None = None

    def push(self, token: StreamToken) -> str:
        """Add the choice's next token; returns the text that can be sent now."""
        piece = self.pieces.push(token.token_id, last=token.finish_reason is not None)
        start = max(0, len(self.text) - self.longest)
        self.text += piece
        hits = [p for p in (self.text.find(stop, start) for stop in self.stops) if p >= 0]
        if hits:
            self.finish_reason = "stop"
            return self._release(min(hits))
        if token.finish_reason is not None:
            self.finish_reason = token.finish_reason
            return self._release(len(self.text))
        return self._release(len(self.text) - self._stop_prefix())

    def _stop_prefix(self) -> int:
        """Length of the longest tail of the text that begins a stop string."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(stop.startswith(self.text[-size:]) for stop in self.stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], end
        return piece


class _Service:
    """Everything the routes need: model, tokenizer, cartridge store, batch engine, limits."""

    def __init__(
        self, config: ServingConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        stop = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.engine = BatchEngine(
            model,
            stop_token_ids=sorted(i for i in stop if i is not None),
            pad_token_id=pad,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
        )
        self.store = CartridgeStore(
            model, config.cartridge_dir, config.catalog_datasets, config.cartridge_cache_size
        )
        self.vocab_size = model.get_input_embeddings().num_embeddings
        text_config = model.config.get_text_config(decoder=True)
        self.max_context = getattr(text_config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ validation
    def check_common(self, request: BaseCompletionRequest, max_tokens: int | None) -> int:
        """Shared checks; returns the ``max_tokens`` to decode."""
        config = self.config
        if request.model not in (config.model_id, config.model_name_or_path):
            raise ServingError(
                f"The model '{request.model}' does not exist on this server; it serves "
                f"'{config.model_id}'.",
                status=404,
                code="model_not_found",
                param="model",
            )
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens:
            raise ServingError(
                f"max_tokens={max_tokens} exceeds this server's limit of {config.max_tokens}.",
                code="max_tokens_exceeded",
                param="max_tokens",
            )
        if request.n > config.max_n:
            raise ServingError(
                f"n={request.n} exceeds this server's limit of {config.max_n}.", param="n"
            )
        if request.top_p < 1.0:
            raise ServingError(
                "top_p < 1 (nucleus sampling) is not supported; use temperature.", param="top_p"
            )
        if len(request.cartridges) > config.max_cartridges:
            raise ServingError(
                f"{len(request.cartridges)} cartridges exceed this server's limit of "
                f"{config.max_cartridges} per request.",
                param="cartridges",
            )
        for ref in request.cartridges:
            if ref.source != "local":
                raise ServingError(
                    f"Cartridge source '{ref.source}' is not supported; this server serves "
                    "'local' cartridges (catalog versions or files in its cartridge directory).",
                    code="unsupported_cartridge_source",
                    param="cartridges",
                )
        if len(request.stop_strings()) > 4:
            raise ServingError("At most 4 stop sequences are allowed.", param="stop")
        return max_tokens

    def check_top_logprobs(self, k: int | None, param: str) -> int:
        if k is not None and k > self.config.max_top_logprobs:
            raise ServingError(
                f"{param}={k} exceeds this server's limit of {self.config.max_top_logprobs}.",
                param=param,
            )
        return k or 0

    def check_context(self, prompts: list[list[int]], prefix_tokens: int, max_tokens: int) -> None:
        for prompt in prompts:
            if not prompt:
                raise ServingError("The prompt is empty after tokenization.", param="prompt")
            if any(not 0 <= token < self.vocab_size for token in prompt):
                raise ServingError(
                    f"Prompt token ids must lie in [0, {self.vocab_size}).", param="prompt"
                )
            needed = prefix_tokens + len(prompt) + max_tokens
            if self.max_context is not None and needed > self.max_context:
                raise ServingError(
                    f"This model's maximum context length is {self.max_context} tokens; the "
                    f"request needs {needed} (cartridges {prefix_tokens} + prompt {len(prompt)} "
                    f"+ max_tokens {max_tokens}).",
                    code="context_length_exceeded",
                    param="max_tokens",
                )

    async def cartridge(self, request: BaseCompletionRequest):
        """The composed cartridge a request names (or none), loaded on the model thread."""
        if not request.cartridges:
            return (), None
        ids = [ref.id for ref in request.cartridges]
        return await self.engine.run_on_model_thread(self.store.get, ids)

    # ------------------------------------------------------------------ rendering
    def render(self, row: Row, stops: list[str]) -> _Rendered:
        """Split a row's text into per-token pieces and apply stop strings."""
        ids, pieces = row.token_ids, _Detokenizer(self.tokenizer)
        deltas = [pieces.push(token_id, last=i == len(ids) - 1) for i, token_id in enumerate(ids)]
        keep, finish = len(ids), "stop" if row.stopped else "length"
        if stops:
            text = ""
            for i, delta in enumerate(deltas):
                start = max(0, len(text) - max(len(s) for s in stops))
                text += delta
                hits = [p for p in (text.find(s, start) for s in stops) if p >= 0]
                if hits:
                    keep, finish, sent = i + 1, "stop", 0
                    for j in range(keep):  # the stop string may begin in an earlier piece
                        deltas[j] = deltas[j][: max(0, min(hits) - sent)]
                        sent += len(deltas[j])
                    break
        top_ids = row.top_ids.tolist() if row.top_ids is not None else []
        top_values = row.top_logprobs.tolist() if row.top_logprobs is not None else []
        return _Rendered(
            token_ids=ids[:keep],
            deltas=deltas[:keep],
            logprobs=row.logprobs[:keep],
            top_ids=top_ids[:keep],
            top_logprobs=top_values[:keep],
            finish_reason=finish,
        )

    def token_text(self, token_id: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        return self.token_bytes_text(token_id)

    def token_bytes_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, rendered: _Rendered, as_ids: bool) -> list:
        entries = []
        for i in range(len(rendered.token_ids)):
            token_id = rendered.token_ids[i]
            token = self.token_text(token_id, as_ids)
            top = []
            for top_id, value in zip(rendered.top_ids[i], rendered.top_logprobs[i], strict=True):
                text = self.token_text(top_id, as_ids)
                top.append(
                    {
                        "token": text,
                        "logprob": value,
                        "bytes": list(self.token_bytes_text(top_id).encode()),
                        "token_id": top_id,
                    }
                )
            entries.append(
                {
                    "token": token,
                    "logprob": rendered.logprobs[i],
                    "bytes": list(self.token_bytes_text(token_id).encode()),
                    "token_id": token_id,
                    "top_logprobs": top,
                }
            )
        return entries

    def completion_logprobs(self, rendered: _Rendered, as_ids: bool, offset: int) -> dict:
        tokens = [self.token_text(t, as_ids) for t in rendered.token_ids]
        offsets = []
        for delta in rendered.deltas:
            offsets.append(offset)
            offset += len(delta)
        top = [
            {self.token_text(t, as_ids): v for t, v in zip(ids, values, strict=True)}
            for ids, values in zip(rendered.top_ids, rendered.top_logprobs, strict=True)
        ]
        return {
            "tokens": tokens,
            "token_logprobs": rendered.logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
            "token_ids": rendered.token_ids,
            "top_token_ids": rendered.top_ids,
            "top_token_logprobs": rendered.top_logprobs,
        }


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _usage(prompts: list[list[int]], completion: int, prefix_tokens: int) -> dict:
    prompt = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cartridge_tokens": prefix_tokens,
    }


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# --------------------------------------------------------------------------- the app
def _response_head(kind: str, model_id: str) -> dict:
    """The fields every (chat) completion response and stream chunk starts with."""
    return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}


def create_app(
    config: ServingConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> FastAPI:
    """Build the server for ``config``; pass ``model`` and ``tokenizer`` to skip loading them."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config.model_name_or_path, config.dtype, config.device)
    service = _Service(config, model, tokenizer)

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
    app.add_middleware(_Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        """Liveness, queue depth and batching counters."""
        stats = service.engine.stats
        return {
            "status": "ok",
            "model": config.model_id,
            "pending": service.engine.pending,
            "cartridges_cached": len(service.store),
            "requests": stats.requests,
            "batches": stats.batches,
            "max_batch_rows": stats.max_batch_rows,
            "generated_tokens": stats.generated_tokens,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        """The one model this server serves."""
        return {
            "object": "list",
            "data": [
                {"id": config.model_id, "object": "model", "created": 0, "owned_by": "cartridges"}
            ],
        }

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict:
        """Token ids of a prompt, as vLLM answers: self-study compares them with its tokenizer."""
        ids = service.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)
        tokens = list(ids["input_ids"])
        return {"count": len(tokens), "max_model_len": service.max_context, "tokens": tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        """Chat, optionally with cartridges standing in for the system message."""
        max_tokens = service.check_common(
            request, request.max_completion_tokens or request.max_tokens
        )
        if len(request.messages) > config.max_messages:
            raise ServingError(
                f"{len(request.messages)} messages exceed this server's limit of "
                f"{config.max_messages}.",
                param="messages",
            )
        top_k = service.check_top_logprobs(request.top_logprobs, "top_logprobs")
        key, cartridge = await service.cartridge(request)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        try:
            if cartridge is not None:
                prompt = continuation_ids(tokenizer, _SYSTEM_PLACEHOLDER, messages, True)
            else:
                prompt = chat_ids(tokenizer, messages, True)
        except Exception as error:  # noqa: BLE001 - jinja templates raise their own types
            raise ServingError(
                f"The chat template refused these messages: {error}", param="messages"
            ) from error
        prefix_tokens = cartridge.num_tokens if cartridge is not None else 0
        service.check_context([prompt], prefix_tokens, max_tokens)
        job = Job(
            prompts=[prompt] * request.n,
            cartridge_key=key,
            cartridge=cartridge,
            max_tokens=max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            logprobs=request.logprobs,
            top_logprobs=top_k if request.logprobs else 0,
        )
        head = _response_head("chatcmpl", config.model_id)
        if request.stream:
            return _stream(_chat_chunks(service, request, job, head, [prompt], prefix_tokens))
        rows = await service.engine.submit(job)
        stops = request.stop_strings()
        rendered = [service.render(row, stops) for row in rows]
        usage = _usage([prompt], sum(len(r.token_ids) for r in rendered), prefix_tokens)
        as_ids = request.return_tokens_as_token_ids
        choices = []
        for index, r in enumerate(rendered):
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": {"content": service.chat_logprobs(r, as_ids)}
                if request.logprobs
                else None,
                "finish_reason": r.finish_reason,
            }
            if request.return_token_ids:
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        body = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        if request.return_token_ids:
            body["prompt_token_ids"] = prompt
        return body

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        """Text completion of a raw prompt (text or token ids) after the cartridges."""
        max_tokens = service.check_common(request, request.max_tokens)
        if request.echo:
            raise ServingError("echo=true is not supported.", param="echo")
        top_k = service.check_top_logprobs(request.logprobs, "logprobs")
        key, cartridge = await service.cartridge(request)
        prompts = _completion_prompts(request.prompt, tokenizer, with_bos=cartridge is None)
        prefix_tokens = cartridge.num_tokens if cartridge is not None else 0
        service.check_context(prompts, prefix_tokens, max_tokens)
        job = Job(
            prompts=[p for p in prompts for _ in range(request.n)],
            cartridge_key=key,
            cartridge=cartridge,
            max_tokens=max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            logprobs=request.logprobs is not None,
            top_logprobs=top_k,
        )
        head = _response_head("cmpl", config.model_id)
        if request.stream:
            return _stream(_completion_chunks(service, request, job, head, prompts, prefix_tokens))
        rows = await service.engine.submit(job)
        stops = request.stop_strings()
        rendered = [service.render(row, stops) for row in rows]
        usage = _usage(prompts, sum(len(r.token_ids) for r in rendered), prefix_tokens)
        as_ids = request.return_tokens_as_token_ids
        choices = []
        for index, r in enumerate(rendered):
            choice = {
                "index": index,
                "text": r.text,
                "logprobs": service.completion_logprobs(r, as_ids, 0)
                if request.logprobs is not None
                else None,
                "finish_reason": r.finish_reason,
            }
            if request.return_token_ids:
                choice["token_ids"] = r.token_ids
                choice["prompt_token_ids"] = prompts[index // request.n]
            choices.append(choice)
        return {**head, "object": "text_completion", "choices": choices, "usage": usage}

    return app


def _completion_prompts(prompt, tokenizer, with_bos: bool) -> list[list[int]]:
    """Token ids per prompt; after a cartridge no BOS is added (the cartridge begins with it)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ServingError("The prompt list is empty.", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], list):
        return [list(p) for p in prompt]
    return [tokenizer(text, add_special_tokens=with_bos)["input_ids"] for text in prompt]


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        _ending_errors(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _ending_errors(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chunks; a failure is sent as an OpenAI error event, the 200 status having gone out."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:  # noqa: BLE001 - the client is told, and the log has the details
        logger.exception("A streamed response failed")
        message = "Internal server error; see the server log."
        error = {"message": message, "type": "server_error", "param": None, "code": None}
        yield _sse({"error": error})
        yield _sse("[DONE]")


async def _released(
    service: _Service, job: Job, stops: list[str]
) -> AsyncIterator[tuple[int, int, _Rendered]]:
    """``(choice, offset, piece)`` for each token of ``job`` as it is decoded, until all end.

    ``piece`` holds one kept token, the text it releases and, on its choice's last token, the
    finish reason; ``offset`` characters of that choice were released before it.
    """
    texts = [_TextStream(service.tokenizer, stops) for _ in job.prompts]
    async with aclosing(service.engine.stream(job)) as stream:
        async for tokens in stream:
            for token in tokens:
                text = texts[token.choice]
                if text.finish_reason is not None:  # decoded on past a stop string
                    continue
                offset = text.sent
                piece = _Rendered(
                    token_ids=[token.token_id],
                    deltas=[text.push(token)],
                    logprobs=[token.logprob],
                    top_ids=[token.top_ids],
                    top_logprobs=[token.top_logprobs],
                    finish_reason=text.finish_reason,
                )
                yield token.choice, offset, piece
            if all(text.finish_reason is not None for text in texts):
                return


async def _chat_chunks(service, request, job, head, prompts, prefix_tokens) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    as_ids = request.return_tokens_as_token_ids
    for index in range(len(job.prompts)):
        delta = {"role": "assistant", "content": ""}
        yield _sse({**head, "choices": [_chunk_choice(index, delta)]})
    completion = 0
    async for index, _, piece in _released(service, job, request.stop_strings()):
        completion += 1
        logprobs = None
        if request.logprobs:
            logprobs = {"content": service.chat_logprobs(piece, as_ids)}
        choice = _chunk_choice(index, {"content": piece.text}, logprobs)
        if request.return_token_ids:
            choice["token_ids"] = piece.token_ids
        yield _sse({**head, "choices": [choice]})
        if piece.finish_reason is not None:
            yield _sse({**head, "choices": [_chunk_choice(index, {}, None, piece.finish_reason)]})
    if request.stream_options and request.stream_options.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompts, completion, prefix_tokens)})
    yield _sse("[DONE]")


async def _completion_chunks(
    service, request, job, head, prompts, prefix_tokens
) -> AsyncIterator[str]:
    head = {**head, "object": "text_completion"}
    as_ids = request.return_tokens_as_token_ids
    completion = 0
    async for index, offset, piece in _released(service, job, request.stop_strings()):
        completion += 1
        logprobs = None
        if request.logprobs is not None:
            logprobs = service.completion_logprobs(piece, as_ids, offset)
        choice = {"index": index, "text": piece.text, "logprobs": logprobs, "finish_reason": None}
        if request.return_token_ids:
            choice["token_ids"] = piece.token_ids
        yield _sse({**head, "choices": [choice]})
        if piece.finish_reason is not None:
            final = {"index": index, "text": "", "logprobs": None}
            final["finish_reason"] = piece.finish_reason
            yield _sse({**head, "choices": [final]})
    if request.stream_options and request.stream_options.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompts, completion, prefix_tokens)})
    yield _sse("[DONE]")


def _chunk_choice(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_: Request, error: ServingError) -> JSONResponse:
        return error_response(error.status, str(error), error.code, error.param, error.kind)

    @app.exception_handler(CartridgeLookupError)
    async def lookup_error(_: Request, error: CartridgeLookupError) -> JSONResponse:
        return error_response(error.status, str(error), error.code, "cartridges")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", detail.get("msg", ""))
            return error_response(400, f"Malformed JSON body: {reason}", code="invalid_json")
        parts = []
        for e in errors[:5]:
            location = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{location or 'body'}: {e.get('msg', 'invalid')}")
        first = (
            ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else None
        )
        return error_response(422, "Invalid request: " + "; ".join(parts), param=first or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error while serving a request")
        return error_response(
            500, "Internal server error; see the server log.", kind="server_error"
        )
