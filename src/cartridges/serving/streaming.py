"""Server-sent events: OpenAI's stream chunks, one per generated token, as the model decodes them.

The engine hands each step's tokens over while the batch goes on decoding; each choice's
:class:`~cartridges.serving.text.TextStream` decides what text a token releases. A failure after
the 200 status has gone out is sent as an OpenAI error event, then ``[DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from cartridges.serving.jobs import Job
from cartridges.serving.protocol import ChatCompletionRequest, CompletionRequest
from cartridges.serving.responses import chat_logprobs, completion_choice, sse, usage
from cartridges.serving.service import Service
from cartridges.serving.text import Rendered, TextStream

logger = logging.getLogger(__name__)


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """The SSE response sending ``chunks``.

    A client that leaves ends it: Starlette then closes ``chunks``, and the engine withdraws the
    job (:meth:`~cartridges.serving.engine.ContinuousEngine.stream`).
    """
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
        yield sse({"error": error})
        yield sse("[DONE]")


async def released(
    service: Service, job: Job, stops: list[str]
) -> AsyncIterator[tuple[int, Rendered]]:
    """``(choice, piece)`` for each token of ``job`` as it is decoded, until all choices end.

    ``piece`` holds one kept token, the text it releases, its offset and, on its choice's last
    token, the finish reason.
    """
    texts = [TextStream(service.tokenizer, stops) for _ in job.prompts]
    async with aclosing(service.engine.stream(job)) as stream:
        async for tokens in stream:
            for token in tokens:
                text = texts[token.choice]
                if text.finish_reason is not None:  # decoded on past a stop string
                    continue
                piece = Rendered(
                    token_ids=[token.token_id],
                    text=text.push(token),
                    offsets=[text.offset],
                    logprobs=[token.logprob],
                    top_ids=[token.top_ids],
                    top_logprobs=[token.top_logprobs],
                    finish_reason=text.finish_reason,
                )
                yield token.choice, piece
            if all(text.finish_reason is not None for text in texts):
                return


async def chat_chunks(
    service: Service,
    request: ChatCompletionRequest,
    job: Job,
    head: dict,
    prompt: list[int],
    prefix_tokens: int,
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, one per token, the finish reasons, usage."""
    head = {**head, "object": "chat.completion.chunk"}
    for index in range(len(job.prompts)):
        yield sse({**head, "choices": [_delta(index, {"role": "assistant", "content": ""})]})
    completion = 0
    async for index, piece in released(service, job, request.stop_strings()):
        completion += 1
        logprobs = None
        if request.logprobs:
            as_ids = request.return_tokens_as_token_ids
            logprobs = {"content": chat_logprobs(service.tokenizer, piece, as_ids)}
        choice = _delta(index, {"content": piece.text}, logprobs)
        if request.return_token_ids:
            choice["token_ids"] = piece.token_ids
        yield sse({**head, "choices": [choice]})
        if piece.finish_reason is not None:
            yield sse({**head, "choices": [_delta(index, {}, None, piece.finish_reason)]})
    if request.stream_options and request.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage([prompt], completion, prefix_tokens)})
    yield sse("[DONE]")


async def completion_chunks(
    service: Service,
    request: CompletionRequest,
    job: Job,
    head: dict,
    prompts: list[list[int]],
    prefix_tokens: int,
) -> AsyncIterator[str]:
    """``text_completion`` events: one per token, then each choice's finish reason, usage."""
    head = {**head, "object": "text_completion"}
    completion = 0
    async for index, piece in released(service, job, request.stop_strings()):
        completion += 1
        finish_reason, piece.finish_reason = piece.finish_reason, None
        choice = completion_choice(service.tokenizer, request, index, piece)
        yield sse({**head, "choices": [choice]})
        if finish_reason is not None:
            final = {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}
            yield sse({**head, "choices": [final]})
    if request.stream_options and request.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompts, completion, prefix_tokens)})
    yield sse("[DONE]")


def _delta(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
