"""Prompt token ids of a request: a chat rendered by the chat template, or a raw prompt.

After a cartridge the prompt is what follows the system turn in the full rendering
(:func:`cartridges.chat.continuation_ids`): the cartridge stands in for that system turn.
Limits on the result are checked in :mod:`cartridges.serving.validation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from cartridges.chat import chat_ids, continuation_ids
from cartridges.serving.errors import ServingError
from cartridges.serving.protocol import ChatMessage

# Tokens after a cartridge are the chat rendering after the system turn, whatever its text.
SYSTEM_PLACEHOLDER = "context"


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    after_cartridge: bool,
    template_kwargs: Mapping[str, Any],
) -> list[int]:
    """The ids the model reads after the cartridge (or from the start, without one)."""
    conversation = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    try:
        if after_cartridge:
            return continuation_ids(
                tokenizer, SYSTEM_PLACEHOLDER, conversation, True, template_kwargs
            )
        return chat_ids(tokenizer, conversation, True, template_kwargs)
    except Exception as error:  # noqa: BLE001 - jinja templates raise their own types
        raise ServingError(
            f"The chat template refused these messages: {error}", param="messages"
        ) from error


def completion_prompts(
    prompt: str | list, tokenizer: PreTrainedTokenizerBase, with_bos: bool
) -> list[list[int]]:
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
