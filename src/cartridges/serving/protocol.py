"""Request bodies of the OpenAI-compatible endpoints, plus this server's extensions.

Extensions: ``cartridges`` (KV prefixes to answer with, composed in order), vLLM's
``return_tokens_as_token_ids`` (logprob tokens as ``"token_id:<id>"``) and ``return_token_ids``
(generated and prompt ids in the response). Every log-probability entry also carries a
``token_id`` field, so a self-study client can map teacher distributions back to ids exactly.
Unknown fields are ignored, as OpenAI clients send fields that this server does not use.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

_LIMITS = ConfigDict(extra="ignore", allow_inf_nan=False)
MaxTokens = Annotated[int | None, Field(default=None, ge=1)]


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: clients check that this server tokenizes as they do."""

    model_config = _LIMITS
    model: str | None = None
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = True


class CartridgeRef(BaseModel):
    """A cartridge to answer with: a catalog name (``cartridge[@version]``) or a file id."""

    model_config = _LIMITS
    id: str = Field(min_length=1, max_length=512)
    source: str = Field(default="local", max_length=64)


class TextPart(BaseModel):
    model_config = _LIMITS
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _LIMITS
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


class BaseCompletionRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = _LIMITS
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

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


class CompletionRequest(BaseCompletionRequest):
    """``POST /v1/completions``: a text or token-id prompt, or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
