"""Word-level tokenizer and chat template for the toy world.

Every word of the toy language is one token, so facts, questions and answers have a fixed token
layout the tiny model can learn quickly. The tokenizer is built offline with the ``tokenizers``
library (nothing to download) and wrapped as a standard ``PreTrainedTokenizerFast`` so the rest
of the project treats it like any Hugging Face chat tokenizer.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cartridges.toy_world.language import ROLE_TOKENS, SPECIAL_TOKENS, all_words

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy world roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<' + message['role'] + '> ' + (message['content'] | trim) + ' <end> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
"""``<bos> <system> doc <end> <user> q <end> <assistant> a <end>``: each turn opens with its role
token (a segment start for the model's shift embedding) and closes with ``<end>`` (the eos)."""


def special_token_list() -> list[str]:
    """Special tokens in id order: pad=0, unk=1, bos=2, eos=3, then the role tokens."""
    return [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")] + list(ROLE_TOKENS.values())


def build_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build the toy-world tokenizer deterministically (same vocabulary and ids every time).

    No bos is added by plain ``tokenizer(text)`` calls: the chat template adds it, which keeps
    ``decode(..., skip_special_tokens=True)`` followed by re-encoding an exact round trip.
    """
    specials = special_token_list()
    vocab = {tok: i for i, tok in enumerate(specials + all_words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    logger.debug("built toy-world tokenizer with %d tokens", len(tok))
    return tok


def segment_start_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that start a segment for the model's shift embedding: pad, bos and the role tokens."""
    toks = [SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["bos"], *ROLE_TOKENS.values()]
    return [tokenizer.convert_tokens_to_ids(t) for t in toks]


def encode_conversation(
    tokenizer: PreTrainedTokenizerFast,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    bos_before_first_user: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a chat (identical to ``apply_chat_template``) and a mask of assistant tokens.

    The mask marks each assistant message's content and its closing ``<end>``: the positions a
    pretraining loss is taken on. ``bos_before_first_user`` inserts a ``<bos>`` before the first
    user turn (a layout the model should tolerate: a conversation encoded on its own after a
    cartridge or a separately encoded document). Encoding word by word is much faster than
    rendering the Jinja template for every training example.
    """
    vocab = tokenizer.get_vocab()
    unk = vocab[SPECIAL_TOKENS["unk"]]
    eos = vocab[SPECIAL_TOKENS["eos"]]
    ids: list[int] = [vocab[SPECIAL_TOKENS["bos"]]]
    mask: list[bool] = [False]
    seen_user = False
    for message in messages:
        role = message["role"]
        if role == "user" and not seen_user:
            seen_user = True
            if bos_before_first_user:
                ids.append(vocab[SPECIAL_TOKENS["bos"]])
                mask.append(False)
        words = [vocab.get(w, unk) for w in message["content"].split()]
        train = role == "assistant"
        ids += [vocab[ROLE_TOKENS[role]], *words, eos]
        mask += [False] + [train] * (len(words) + 1)
    if add_generation_prompt:
        ids.append(vocab[ROLE_TOKENS["assistant"]])
        mask.append(False)
    return ids, mask
