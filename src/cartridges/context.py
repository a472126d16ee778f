"""The corpus in context: the system message a cartridge stands in for, built in one place.

ICL evaluation, the text initialiser, the cartridge's size rule and the LoRA baseline all need
the same thing: the whole corpus formatted into the system prompt and tokenised by the chat
template. Building it once here keeps them from drifting apart (a different separator or
template switch would silently change what "ICL" and "compression" mean). The stages of one
run ask for the same context with their own copy of the tokenizer; it is tokenised once per
process (a real corpus of 10^6 tokens takes seconds) and handed to each as its own copy.
"""

from __future__ import annotations

import hashlib
import json
import threading
from array import array
from collections import OrderedDict
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
    """Put ``texts`` into ``system_prompt``'s ``{chunk}`` slot and tokenise it as a system turn.

    A context asked for again with an equal tokenizer (its vocabulary, merges, special tokens
    and chat template) and the same switches is not tokenised again.
    """
    corpus_text = join_documents(texts)
    system_text = system_prompt.format(chunk=corpus_text)
    sha256 = text_digest(corpus_text)
    key = (tokenizer_identity(tokenizer), text_digest(system_text), _switches(template_kwargs))
    with _RECENT_LOCK:
        ids = _RECENT.get(key)
        if ids is not None:
            _RECENT.move_to_end(key)
    if ids is None:
        ids = array("q", context_ids(tokenizer, system_text, template_kwargs))
        with _RECENT_LOCK:
            _RECENT[key] = ids
            while len(_RECENT) > 1 and sum(map(len, _RECENT.values())) > _RECENT_MAX_TOKENS:
                _RECENT.popitem(last=False)
    return CorpusContext(system_text=system_text, ids=ids.tolist(), sha256=sha256)


# Token ids of the contexts built last, by (tokenizer, system text, switches); oldest first.
_RECENT: OrderedDict[tuple[str, str, str], array] = OrderedDict()
_RECENT_MAX_TOKENS = 1 << 23  # 64 MiB of ids; the newest context is kept whatever its size
_RECENT_LOCK = threading.Lock()


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what decides how ``tokenizer`` tokenises a chat: equal for copies of one
    tokenizer, different once a token, a merge or the chat template differs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    )
    described = json.dumps(
        [
            type(tokenizer).__qualname__,
            tokenizer.chat_template,
            sorted(map(str, tokenizer.all_special_tokens)),
        ],
        default=str,
    )
    return hashlib.sha256((vocabulary + described).encode()).hexdigest()


def _switches(template_kwargs: TemplateKwargs) -> str:
    return json.dumps(dict(template_kwargs or {}), sort_keys=True, default=repr)
