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
import weakref
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

    A context asked for again with an equal tokenizer (:func:`tokenizer_identity`) and the same
    switches is not tokenised again.
    """
    corpus_text = join_documents(texts)
    system_text = system_prompt.format(chunk=corpus_text)
    sha256 = text_digest(corpus_text)
    identity = tokenizer_identity(tokenizer)
    if identity is None:
        ids = context_ids(tokenizer, system_text, template_kwargs)
        return CorpusContext(system_text=system_text, ids=ids, sha256=sha256)
    key = (identity, text_digest(system_text), _switches(template_kwargs))
    with _RECENT_LOCK:
        kept = _RECENT.get(key)
        if kept is not None:
            _RECENT.move_to_end(key)
    if kept is None:
        kept = array("q", context_ids(tokenizer, system_text, template_kwargs))
        with _RECENT_LOCK:
            _RECENT[key] = kept
            while len(_RECENT) > 1 and sum(map(len, _RECENT.values())) > _RECENT_MAX_TOKENS:
                _RECENT.popitem(last=False)
    return CorpusContext(system_text=system_text, ids=kept.tolist(), sha256=sha256)


# Token ids of the contexts built last, by (tokenizer, system text, switches); oldest first.
_RECENT: OrderedDict[tuple[str, str, str], array] = OrderedDict()
_RECENT_MAX_TOKENS = 1 << 23  # 64 MiB of ids; the newest context is kept whatever its size
_RECENT_LOCK = threading.Lock()


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of what decides how ``tokenizer`` tokenises a chat (its whole serialised
    tokenizer, which special token is which, the chat template): equal for copies of one
    tokenizer, different once a token, a merge or the template differs. ``None`` for a tokenizer
    without a serialisable backend (a slow one), whose contexts are not kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    stamp = (len(tokenizer), tokenizer.chat_template)  # what a caller changes in place
    known = _IDENTITIES.get(tokenizer)
    if known is not None and known[0] == stamp:
        return known[1]
    described = json.dumps(
        [
            type(tokenizer).__qualname__,
            tokenizer.chat_template,
            tokenizer.special_tokens_map,
            tokenizer.init_kwargs.get("add_bos_token"),
            tokenizer.init_kwargs.get("add_eos_token"),
        ],
        sort_keys=True,
        default=str,
    )
    identity = hashlib.sha256((backend.to_str() + described).encode()).hexdigest()
    _IDENTITIES[tokenizer] = (stamp, identity)
    return identity


# Each live tokenizer's identity (serialising it takes ~50 ms for a 49k vocabulary: once per
# document of a large corpus would add up), recomputed once tokens or the template change.
_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _switches(template_kwargs: TemplateKwargs) -> str:
    return json.dumps(dict(template_kwargs or {}), sort_keys=True, default=repr)
