"""Chat formatting, always through the tokenizer's own chat template (never hand-written ids)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
TemplateKwargs = Mapping[str, Any] | None
"""Extra variables for the chat template, e.g. ``{"enable_thinking": False}`` for Qwen3.

Which switches exist is the template's business; unknown ones are ignored by Jinja.
"""


def chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    template_kwargs: TemplateKwargs = None,
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"Tokenizer '{tokenizer.name_or_path}' has no chat template; self-study and evaluation "
            "format conversations with it. Use an instruct/chat model or set one."
        )
    return list(
        tokenizer.apply_chat_template(
            list(messages),
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
            **dict(template_kwargs or {}),
        )
    )


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token in every sequence.

    Templates may render a system message differently depending on what follows it, so the
    prefix that can be shared is computed from the token ids, not assumed.
    """
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def context_ids(
    tokenizer: PreTrainedTokenizerBase, system_text: str, template_kwargs: TemplateKwargs = None
) -> list[int]:
    """Token ids of a conversation's opening: the system message that carries the context.

    This is what a cartridge stands in for: the teacher sees ``context_ids(chunk)`` and then the
    conversation, the student sees the cartridge and then the same conversation tokens.
    """
    return chat_ids(
        tokenizer, [{"role": "system", "content": system_text}], template_kwargs=template_kwargs
    )


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase,
    system_text: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    template_kwargs: TemplateKwargs = None,
) -> list[int]:
    """Token ids of ``messages`` as they follow the system message in the full rendering."""
    full = chat_ids(
        tokenizer,
        [{"role": "system", "content": system_text}, *messages],
        add_generation_prompt,
        template_kwargs,
    )
    prefix = context_ids(tokenizer, system_text, template_kwargs)
    if full[: len(prefix)] != prefix:
        raise ValueError(
            f"The chat template of '{tokenizer.name_or_path}' renders the system message "
            "differently when other messages follow it, so the context cannot be replaced by a "
            "prefix cache. Use a template whose system turn is a stable prefix."
        )
    return full[len(prefix) :]


def end_of_turn_id(
    tokenizer: PreTrainedTokenizerBase, template_kwargs: TemplateKwargs = None
) -> int:
    """The special token the chat template puts after an assistant's text (Gemma's
    ``<end_of_turn>``, Qwen's ``<|im_end|>``), or the tokenizer's eos when it puts none.

    Servers often leave the token they stopped at out of a reply; the turn still ends with it, and
    a model whose eos is not its end of turn must see the one its template writes.
    """
    if tokenizer.chat_template is None:
        return tokenizer.eos_token_id
    renders = [
        chat_ids(
            tokenizer,
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}],
            template_kwargs=template_kwargs,
        )
        for answer in ("a", "b")
    ]
    shorter = min(len(ids) for ids in renders)
    common_suffix = 0
    while (
        common_suffix < shorter and renders[0][-1 - common_suffix] == renders[1][-1 - common_suffix]
    ):
        common_suffix += 1
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    after_answer = renders[0][len(renders[0]) - common_suffix :]
    return next((t for t in after_answer if t in special), tokenizer.eos_token_id)
