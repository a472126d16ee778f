"""The corpus in context: the system message a cartridge stands in for, built in one place.

ICL evaluation, the text initialiser, the cartridge's size rule and the LoRA baseline all need
the same thing: the whole corpus formatted into the system prompt and tokenised by the chat
template. Building it once here keeps them from drifting apart (a different separator or
template switch would silently change what "ICL" and "compression" mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cartridges.chat import TemplateKwargs, context_ids
from cartridges.corpus import text_digest

DOCUMENT_SEPARATOR = "\n\n"


def join_documents(texts: Sequence[str]) -> str:
    """The whole corpus as one text, documents separated by a blank line."""
    return DOCUMENT_SEPARATOR.join(texts)


@dataclass(frozen=True)
class CorpusContext:
    """The corpus as the teacher reads it: the system message, its token ids and its hash."""

    system_text: str
    ids: list[int]
    sha256: str
    """Hash of the corpus text itself (not the prompt around it): names what was distilled."""

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def corpus_context(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str,
    template_kwargs: TemplateKwargs = None,
) -> CorpusContext:
    """Put ``texts`` into ``system_prompt``'s ``{chunk}`` slot and tokenise it as a system turn."""
    corpus_text = join_documents(texts)
    system_text = system_prompt.format(chunk=corpus_text)
    return CorpusContext(
        system_text=system_text,
        ids=context_ids(tokenizer, system_text, template_kwargs),
        sha256=text_digest(corpus_text),
    )
