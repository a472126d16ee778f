"""Request checks and cartridge lookup: what a request may ask of this server, and with what.

Every refusal names the field (``param``) and quotes the offending value, in OpenAI's error
shape. Checks run before any model work; the only one after it is :func:`check_context`, which
needs the prompt's length after the cartridges are known. Cartridge files are resolved here
(cheap path checks) and loaded by :meth:`~cartridges.serving.service.Service.cartridge`.

A request's cartridges are the one its ``model`` names, if it names one (vLLM's convention for
adapters: ``/v1/models`` lists each cartridge as a model whose parent is the base model), then
those of its ``cartridges`` field, composed in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cartridges.serving.errors import ServingError
from cartridges.serving.protocol import (
    BaseCompletionRequest,
    ChatCompletionRequest,
    CompletionRequest,
)
from cartridges.serving.service import Service
from cartridges.serving.store import CartridgeLookupError

MAX_STOPS = 4


@dataclass
class Checked:
    """What a request asks for, once checked.

    Attributes:
        max_tokens: tokens to decode at most.
        cartridge_ids: the cartridges to compose, in order (the ``model`` one first).
        model_id: the id answers report: the cartridge's when ``model`` names one.
        model_cartridge: whether ``model`` names a cartridge (then the first of ``cartridge_ids``).
        top_logprobs: most likely tokens to report per position (0: none).
    """

    max_tokens: int
    cartridge_ids: list[str]
    model_id: str
    model_cartridge: bool = False
    top_logprobs: int = 0


def check_chat(service: Service, request: ChatCompletionRequest) -> Checked:
    """Checks of a chat request that need no model work."""
    checked = _check_common(service, request, request.max_completion_tokens or request.max_tokens)
    limit = service.config.max_messages
    if len(request.messages) > limit:
        raise ServingError(
            f"{len(request.messages)} messages exceed this server's limit of {limit}.",
            param="messages",
        )
    _refuse_system_with_cartridges(request, checked.cartridge_ids)
    checked.top_logprobs = _check_top_logprobs(service, request.top_logprobs, "top_logprobs")
    if not request.logprobs:
        checked.top_logprobs = 0
    return checked


def check_completion(service: Service, request: CompletionRequest) -> Checked:
    """Checks of a text completion request that need no model work."""
    checked = _check_common(service, request, request.max_tokens)
    if request.echo:
        raise ServingError("echo=true is not supported.", param="echo")
    checked.top_logprobs = _check_top_logprobs(service, request.logprobs, "logprobs")
    return checked


def template_kwargs(service: Service, request: ChatCompletionRequest) -> dict[str, Any]:
    """The request's ``chat_template_kwargs`` merged over the configured ones.

    Names that the chat rendering sets itself (``tokenize``, ``chat_template``, ``messages``,
    the special tokens...) are refused: they would change how the template is applied, not
    switch something inside it.
    """
    requested = request.chat_template_kwargs or {}
    refused = sorted(set(requested) & service.reserved_template_names)
    if refused:
        raise ServingError(
            f"chat_template_kwargs may not set {refused}: the server sets them itself; use it "
            "for the template's own switches, e.g. {'enable_thinking': false}.",
            param="chat_template_kwargs",
        )
    return service.template_kwargs(requested)


def check_context(
    service: Service, prompts: list[list[int]], prefix_tokens: int, max_tokens: int
) -> None:
    """Each prompt is non-empty, in the vocabulary, and fits the model after the cartridges.

    It must also fit the continuous scheduler's KV budget on its own, else it would never start.
    """
    for prompt in prompts:
        if not prompt:
            raise ServingError("The prompt is empty after tokenization.", param="prompt")
        if any(not 0 <= token < service.vocab_size for token in prompt):
            raise ServingError(
                f"Prompt token ids must lie in [0, {service.vocab_size}).", param="prompt"
            )
        needed = prefix_tokens + len(prompt) + max_tokens
        if service.max_context is not None and needed > service.max_context:
            raise ServingError(
                f"This model's maximum context length is {service.max_context} tokens; the "
                f"request needs {needed} (cartridges {prefix_tokens} + prompt {len(prompt)} "
                f"+ max_tokens {max_tokens}).",
                code="context_length_exceeded",
                param="max_tokens",
            )
        budget = service.kv_budget_tokens
        if budget is not None and needed > budget:
            raise ServingError(
                f"The request needs {needed} KV tokens (cartridges {prefix_tokens} + prompt "
                f"{len(prompt)} + max_tokens {max_tokens}), more than this server's whole KV "
                f"budget of {budget} (serving.kv_budget_tokens).",
                code="kv_budget_exceeded",
                param="max_tokens",
            )


# --------------------------------------------------------------------------- shared checks
def _check_common(
    service: Service, request: BaseCompletionRequest, max_tokens: int | None
) -> Checked:
    """Unsupported fields, the model, limits and the cartridges, in that order."""
    _refuse_unsupported(request)
    config = service.config
    model_cartridge = _model_cartridge(service, request.model)
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
    cartridge_ids = _cartridge_ids(service, request, model_cartridge)
    if len(request.stop_strings()) > MAX_STOPS:
        raise ServingError(f"At most {MAX_STOPS} stop sequences are allowed.", param="stop")
    model_id = model_cartridge if model_cartridge is not None else config.model_id
    return Checked(max_tokens, cartridge_ids, model_id, model_cartridge is not None)


def _refuse_unsupported(request: BaseCompletionRequest) -> None:
    """400 naming each field the server would otherwise ignore while the client relies on it."""
    asked = request.unsupported()
    if asked:
        reasons = "; ".join(f"'{name}': {why}" for name, why in asked)
        raise ServingError(
            f"Unsupported parameter{'s' if len(asked) > 1 else ''} {reasons}. Leave "
            f"{'them' if len(asked) > 1 else 'it'} out (or null): this server does not ignore "
            "what it cannot honour.",
            code="unsupported_parameter",
            param=asked[0][0],
        )


def _model_cartridge(service: Service, model: str) -> str | None:
    """The cartridge ``model`` names, or ``None`` when it names the base model."""
    config = service.config
    if model in (config.model_id, config.model_name_or_path):
        return None
    try:
        service.store.resolve(model)
    except CartridgeLookupError as error:
        if error.status == 403:
            raise ServingError(str(error), 403, error.code, "model") from None
        raise ServingError(
            f"The model '{model}' does not exist on this server; it serves '{config.model_id}' "
            "and its cartridges (listed at /v1/models, with parent "
            f"'{config.model_id}').",
            status=404,
            code="model_not_found",
            param="model",
        ) from None
    return model


def _cartridge_ids(
    service: Service, request: BaseCompletionRequest, model_cartridge: str | None
) -> list[str]:
    """The ``model`` cartridge, then the listed ones; all local, at most ``max_cartridges``."""
    ids = [model_cartridge] if model_cartridge is not None else []
    for ref in request.cartridges:
        ids += [ref.id] if ref.id is not None else _selected(service, request, ref.set, ref.select)
    if len(ids) > service.config.max_cartridges:
        raise ServingError(
            f"{len(ids)} cartridges exceed this server's limit of "
            f"{service.config.max_cartridges} per request.",
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
    return ids


def _selected(
    service: Service, request: BaseCompletionRequest, name: str, count: int | None
) -> list[str]:
    """The members of the set ``name`` its retriever picks for the request's question."""
    cartridge_set = service.sets.get(name)
    if cartridge_set is None:
        raise ServingError(
            f"No cartridge set {name!r}: this server has {sorted(service.sets) or 'none'} "
            "(listed at /v1/models).",
            status=404,
            code="cartridge_set_not_found",
            param="cartridges",
        )
    return cartridge_set.select(_question(request), count)


def _question(request: BaseCompletionRequest) -> str:
    """What a set's retriever scores documents for: the last user message, or the one text
    prompt (a selection is per question, so several prompts cannot share one)."""
    if isinstance(request, ChatCompletionRequest):
        asked = [message.text() for message in request.messages if message.role == "user"]
        if asked:
            return asked[-1]
        raise ServingError(
            "Selecting cartridges from a set needs a user message to select for.",
            param="cartridges",
        )
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    raise ServingError(
        "Selecting cartridges from a set needs one text prompt (the selection is made per "
        "question): send one request per prompt, or name the cartridges by id.",
        param="cartridges",
    )


def _refuse_system_with_cartridges(request: ChatCompletionRequest, ids: list[str]) -> None:
    """A cartridge is the KV of the system turn that carried the corpus: it replaces it."""
    if not ids:
        return
    for index, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            raise ServingError(
                f"messages[{index}] is a {message.role} message, but this request answers with "
                f"cartridges {ids}: a cartridge stands in for the system message (it is the KV "
                "cache of the system turn that carried the corpus), so the two cannot be "
                "combined. Put instructions in a user message, or send no cartridges.",
                code="system_message_with_cartridges",
                param="messages",
            )


def _check_top_logprobs(service: Service, k: int | None, param: str) -> int:
    limit = service.config.max_top_logprobs
    if k is not None and k > limit:
        raise ServingError(f"{param}={k} exceeds this server's limit of {limit}.", param=param)
    return k or 0
