"""Request bodies of the OpenAI-compatible endpoints, plus this server's extensions.

Extensions: ``cartridges`` (KV prefixes to answer with, composed in order), vLLM's
``return_tokens_as_token_ids`` (logprob tokens as ``"token_id:<id>"``) and ``return_token_ids``
(generated and prompt ids in the response). Every log-probability entry also carries a
``token_id`` field, so a self-study client can map teacher distributions back to ids exactly.
Chat requests also take vLLM's ``chat_template_kwargs`` (switches of the chat template).

A field that OpenAI (or vLLM's sampling) defines but this server does not honour, such as
``tools`` or ``response_format``, is noted when it asks for something (a value other than null
or its do-nothing default), so that the request is refused naming it rather than answered as
if it were absent (:meth:`BaseCompletionRequest.unsupported`). Bookkeeping fields that do not
change an answer (``user``, ``metadata``, ``store``, ``service_tier``...) and unknown fields are
ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

_LIMITS = ConfigDict(extra="ignore", allow_inf_nan=False)
MaxTokens = Annotated[int | None, Field(default=None, ge=1)]

# field -> (why it cannot be honoured, values that ask for nothing besides null)
Unsupported = dict[str, tuple[str, tuple[Any, ...]]]
_TOOLS = "tool and function calling is not supported (answers are plain text)"
_PENALTIES = "penalties and logit biases are not supported (sampling uses temperature only)"
_SAMPLING: Unsupported = {
    "frequency_penalty": (_PENALTIES, (0,)),
    "presence_penalty": (_PENALTIES, (0,)),
    "logit_bias": (_PENALTIES, ({},)),
    "best_of": ("best_of is not supported; ask for n choices instead", (1,)),
    # vLLM's sampling extensions
    "repetition_penalty": (_PENALTIES, (1,)),
    "top_k": ("top_k sampling is not supported; use temperature", (-1, 0)),
    "min_p": ("min_p sampling is not supported; use temperature", (0,)),
}
CHAT_UNSUPPORTED: Unsupported = {
    "tools": (_TOOLS, ([],)),
    "tool_choice": (_TOOLS, ("none",)),
    "parallel_tool_calls": (_TOOLS, ()),
    "functions": (_TOOLS, ([],)),
    "function_call": (_TOOLS, ("none",)),
    "response_format": (
        "structured output (JSON mode, JSON schema) is not supported",
        ({"type": "text"},),
    ),
    **_SAMPLING,
    "audio": ("only text output is supported", ()),
    "modalities": ("only text output is supported", (["text"],)),
    "prediction": ("predicted outputs are not supported", ()),
    "reasoning_effort": (
        "reasoning effort is not supported; a chat template's thinking switch is set with "
        "chat_template_kwargs",
        (),
    ),
    "verbosity": ("verbosity is not supported", ()),
    "web_search_options": ("web search is not supported", ()),
}
COMPLETION_UNSUPPORTED: Unsupported = {
    **_SAMPLING,
    "suffix": ("suffix (insertion) is not supported", ("",)),
    "chat_template_kwargs": ("a raw prompt is not rendered by the chat template", ({},)),
}
MESSAGE_UNSUPPORTED: Unsupported = {"tool_calls": (_TOOLS, ([],)), "function_call": (_TOOLS, ())}


def _asked(data: Any, table: Unsupported) -> dict[str, Any]:
    """The fields of ``table`` that ``data`` sets to something other than null or a no-op."""
    if not isinstance(data, dict):
        return {}
    return {
        name: data[name]
        for name, (_, neutral) in table.items()
        if data.get(name) is not None and data[name] not in neutral
    }


class _NotesUnsupported(BaseModel):
    """A body that remembers the unsupported fields it was sent (they are not fields of it)."""

    model_config = _LIMITS
    unsupported_fields: ClassVar[Unsupported] = {}
    _asked: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _note_unsupported(cls, data: Any, handler: Any) -> Any:
        body = handler(data)
        if isinstance(body, _NotesUnsupported):
            body._asked = _asked(data, cls.unsupported_fields)
        return body

    def unsupported(self) -> list[tuple[str, str]]:
        """``(field, why it is not supported)`` for each unsupported field this body asks for."""
        return [(name, self.unsupported_fields[name][0]) for name in self._asked]


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: clients check that this server tokenizes as they do."""

    model_config = _LIMITS
    model: str | None = None
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = True


class CartridgeRef(BaseModel):
    """A cartridge to answer with: a catalog name (``cartridge[@version]``), a file id or a set
    member (``<set>:<document>``); or ``set`` (with ``select``: how many, else the set's
    default), the members of a named set the set's retriever picks for the request's question."""

    model_config = _LIMITS
    id: str | None = Field(default=None, min_length=1, max_length=512)
    set: str | None = Field(default=None, min_length=1, max_length=128)
    select: int | None = Field(default=None, ge=1)
    source: str = Field(default="local", max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> CartridgeRef:
        if (self.id is None) == (self.set is None):
            raise ValueError("a cartridge names either an 'id' or a 'set', not both or neither")
        if self.select is not None and self.set is None:
            raise ValueError("'select' goes with 'set' (how many of its cartridges to load)")
        return self


class TextPart(BaseModel):
    model_config = _LIMITS
    type: Literal["text"]
    text: str


class ChatMessage(_NotesUnsupported):
    unsupported_fields = MESSAGE_UNSUPPORTED
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = _LIMITS
    include_usage: bool = False


class BaseCompletionRequest(_NotesUnsupported):
    """Fields shared by chat and text completions."""

    model: str = Field(max_length=512)
    cartridges: list[CartridgeRef] = Field(default_factory=list)
    max_tokens: MaxTokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]


class ChatCompletionRequest(BaseCompletionRequest):
    """``POST /v1/chat/completions``."""

    unsupported_fields = CHAT_UNSUPPORTED
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """The request's unsupported fields, then its messages' (as ``messages[i].field``)."""
        found = super().unsupported()
        for i, message in enumerate(self.messages):
            found += [(f"messages[{i}].{name}", why) for name, why in message.unsupported()]
        return found


class CompletionRequest(BaseCompletionRequest):
    """``POST /v1/completions``: a text or token-id prompt, or a list of them."""

    unsupported_fields = COMPLETION_UNSUPPORTED
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
