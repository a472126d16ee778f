"""OpenAI's response shapes: (chat) completions, their stream chunks, log-probabilities, usage.

Pure functions from :class:`~cartridges.serving.text.Rendered` tokens to JSON-ready dicts, so
that a streamed chunk and a whole answer are built from the same pieces. They validate nothing
and decode nothing beyond a token's own text (for its log-probability entry).
"""

from __future__ import annotations

import json
import time
import uuid

from transformers import PreTrainedTokenizerBase

from cartridges.serving.protocol import ChatCompletionRequest, CompletionRequest
from cartridges.serving.text import Rendered


def response_head(kind: str, model_id: str, selected: list[str] | None = None) -> dict:
    """The fields every (chat) completion response and stream chunk starts with; with
    ``cartridges``, the ids a selection from a set composed (in order), when there was one."""
    head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
    return {**head, "cartridges": selected} if selected is not None else head


def usage(prompts: list[list[int]], completion: int, prefix_tokens: int) -> dict:
    """OpenAI's usage, plus ``cartridge_tokens``: the KV prefix the answer was decoded after."""
    prompt = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cartridge_tokens": prefix_tokens,
    }


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# --------------------------------------------------------------------------- log-probabilities
def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> list[int]:
    return list(tokenizer.decode([token_id], skip_special_tokens=False).encode())


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, rendered: Rendered, as_ids: bool) -> list:
    """``logprobs.content`` of a chat choice; every entry also carries its ``token_id``."""
    entries = []
    for i, token_id in enumerate(rendered.token_ids):
        top = [
            {
                "token": _token_text(tokenizer, top_id, as_ids),
                "logprob": value,
                "bytes": _token_bytes(tokenizer, top_id),
                "token_id": top_id,
            }
            for top_id, value in zip(rendered.top_ids[i], rendered.top_logprobs[i], strict=True)
        ]
        entries.append(
            {
                "token": _token_text(tokenizer, token_id, as_ids),
                "logprob": rendered.logprobs[i],
                "bytes": _token_bytes(tokenizer, token_id),
                "token_id": token_id,
                "top_logprobs": top,
            }
        )
    return entries


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, rendered: Rendered, as_ids: bool
) -> dict:
    """``logprobs`` of a text completion choice, plus the ids of its tokens and top tokens."""
    top = [
        {_token_text(tokenizer, t, as_ids): v for t, v in zip(ids, values, strict=True)}
        for ids, values in zip(rendered.top_ids, rendered.top_logprobs, strict=True)
    ]
    return {
        "tokens": [_token_text(tokenizer, t, as_ids) for t in rendered.token_ids],
        "token_logprobs": rendered.logprobs,
        "top_logprobs": top,
        "text_offset": rendered.offsets,
        "token_ids": rendered.token_ids,
        "top_token_ids": rendered.top_ids,
        "top_token_logprobs": rendered.top_logprobs,
    }


# --------------------------------------------------------------------------- whole answers
def chat_choice(
    tokenizer: PreTrainedTokenizerBase, request: ChatCompletionRequest, index: int, r: Rendered
) -> dict:
    """One choice of a whole chat completion."""
    logprobs = None
    if request.logprobs:
        logprobs = {"content": chat_logprobs(tokenizer, r, request.return_tokens_as_token_ids)}
    choice = {
        "index": index,
        "message": {"role": "assistant", "content": r.text},
        "logprobs": logprobs,
        "finish_reason": r.finish_reason,
    }
    if request.return_token_ids:
        choice["token_ids"] = r.token_ids
    return choice


def chat_completion(
    tokenizer: PreTrainedTokenizerBase,
    request: ChatCompletionRequest,
    head: dict,
    rendered: list[Rendered],
    prompt: list[int],
    prefix_tokens: int,
) -> dict:
    """The ``chat.completion`` object of a whole answer."""
    choices = [chat_choice(tokenizer, request, i, r) for i, r in enumerate(rendered)]
    tokens = sum(len(r.token_ids) for r in rendered)
    body = {
        **head,
        "object": "chat.completion",
        "choices": choices,
        "usage": usage([prompt], tokens, prefix_tokens),
    }
    if request.return_token_ids:
        body["prompt_token_ids"] = prompt
    return body


def completion_choice(
    tokenizer: PreTrainedTokenizerBase, request: CompletionRequest, index: int, r: Rendered
) -> dict:
    """One choice of a text completion (whole, or one token of a stream)."""
    logprobs = None
    if request.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, r, request.return_tokens_as_token_ids)
    choice = {"index": index, "text": r.text, "logprobs": logprobs}
    choice["finish_reason"] = r.finish_reason
    if request.return_token_ids:
        choice["token_ids"] = r.token_ids
    return choice


def text_completion(
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    head: dict,
    rendered: list[Rendered],
    prompts: list[list[int]],
    prefix_tokens: int,
) -> dict:
    """The ``text_completion`` object of whole answers (``n`` choices per prompt, in order)."""
    choices = []
    for index, r in enumerate(rendered):
        choice = completion_choice(tokenizer, request, index, r)
        if request.return_token_ids:
            choice["prompt_token_ids"] = prompts[index // request.n]
        choices.append(choice)
    tokens = sum(len(r.token_ids) for r in rendered)
    return {
        **head,
        "object": "text_completion",
        "choices": choices,
        "usage": usage(prompts, tokens, prefix_tokens),
    }
