"""The toy language: its words, the phrasings of every message, and its special tokens.

The world is a registry of people, each owning one item, written one record per line
(``ada owns plum .``). This module holds only the fixed vocabulary around it: names grouped in
towns, items, question and answer templates, self-study seed prompts, and the tokens that frame a
chat. It samples nothing, so the tokenizer (which needs every word) depends on nothing else.

Two families of question templates exist on purpose: the *ask* templates are what the model writes
when a self-study seed prompt asks it for a question, the *held-out* templates are only used to
evaluate, so an evaluation never quotes the phrasing that self-study produced.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words of a text block (word lists read best as text)."""
    return tuple(text.split())


NAMES: tuple[str, ...] = _words(
    """
    ada abe ali amy ann ari ava bea ben bo cal cam cara cy dan dee del dina dot eda eli ema
    eno eva fay fen fin flo gia gil gus hal hana hugo ian ida ike ina ira isa ivo jan jax jo
    jon jud kai kat kim kip lars lea leo lia lin liv lou luc mae max mei mia milo nan ned nia
    nik noa nor oda ola oli omar otto pam pat pia quin ray rea rex rio ron rosa ruby sal sam
    sia sol stu tad tam tea ted tia tim tova udo uma una val vic vio wes wil wyn xan xia yan
    yara yul zac zed zia zoe zora bram cleo dex elin faye greta hops iris juno kofi lena mira
    """
)
"""128 single-token person names (the keys of the registry)."""

TOWN_SIZE = 32
TOWNS: tuple[tuple[str, ...], ...] = tuple(
    NAMES[i : i + TOWN_SIZE] for i in range(0, len(NAMES), TOWN_SIZE)
)
"""Four towns of 32 residents. A document is the registry of (some of) one town's residents.

Why towns: when asked to write a question, the model must name someone *in the document*.
Copying a uniformly random name out of 32 in context is slow for a tiny model to learn (its
attention must spread over all of them, diluting each), whereas recognising which town a document
is about (a feature all its names share) and naming a resident of that town is easy.
"""

ITEMS: tuple[str, ...] = _words(
    """
    apple anchor basket bell boat book bowl bottle brush bucket candle cap chair clock coin
    comb cup drum fan fig flag flute fork glove hammer harp hat helmet horn jar kettle key
    kite ladder lamp lemon lock mask mirror needle net pan pear pencil pillow pipe plum quilt
    ring rope saw scarf shell shoe spoon stool tent torch towel trumpet vase wagon whistle
    yoyo
    """
)
"""64 single-token items (the values of the registry)."""

ASK_TEMPLATES: tuple[str, ...] = (
    "what does {name} own ?",
    "which item is owned by {name} ?",
    "what is the item of {name} ?",
    "which item does {name} own ?",
)
"""Question phrasings the model writes when a self-study seed prompt asks for a question."""

USE_CASE_TEMPLATES: tuple[str, ...] = ("i want to borrow the item of {name} , what is it ?",)
"""A practical request the model writes for the ``use_case`` seed; also a question."""

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "tell me the thing that belongs to {name} .",
    "{name} has which thing ?",
)
"""Evaluation phrasings: answered in training but never written by the model in self-study."""

ANSWER_TEMPLATE = "{name} owns {item}"
"""The assistant's answer: it repeats the key right before the value (keeps retrieval local)."""

RECORD_TEMPLATE = "{name} owns {item} ."
"""One line of a document."""

STATEMENT_TEMPLATES: dict[str, str] = {
    "structuring": "name {name} item {item}",
    "summarization": "summary : {name} owns {item} and {name2} owns {item2}",
    "creative": "once upon a time {name} owns {item} and is happy",
}
"""What the model writes for the non-question seed types (restating one or two records)."""

CONFIRM_ONE = "the record says {name} owns {item}"
CONFIRM_TWO = "the records say {name} owns {item} and {name2} owns {item2}"
"""How the assistant replies to a statement: it restates the true record(s)."""

SEED_TYPES: tuple[str, ...] = (
    "question",
    "structuring",
    "summarization",
    "use_case",
    "creative",
    "generic",
)

SEED_PROMPTS: dict[str, tuple[str, ...]] = {
    "question": (
        "ask a question about the records",
        "ask me one question about the records",
        "write a question about a record",
    ),
    "structuring": (
        "restate one record as a table",
        "write one record in a structured form",
    ),
    "summarization": (
        "summarise two records",
        "give a short summary of the records",
    ),
    "use_case": (
        "think of a use for the records and ask about it",
        "how would someone use the records ?",
    ),
    "creative": (
        "write a short story about the records",
        "write a little poem about the records",
    ),
    "generic": (
        "start a conversation about the records",
        "say something about the records",
    ),
}
"""Self-study seed prompts (the user message given to bot A), in the toy language."""

SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<bos>",
    "eos": "<end>",
    "system": "<system>",
    "user": "<user>",
    "assistant": "<assistant>",
}
ROLE_TOKENS: dict[str, str] = {r: SPECIAL_TOKENS[r] for r in ("system", "user", "assistant")}


def all_words() -> list[str]:
    """Every ordinary (non-special) word of the toy language, in a fixed order."""
    texts: list[str] = []
    texts += list(ASK_TEMPLATES) + list(USE_CASE_TEMPLATES) + list(HELDOUT_TEMPLATES)
    texts += [ANSWER_TEMPLATE, RECORD_TEMPLATE, CONFIRM_ONE, CONFIRM_TWO]
    texts += list(STATEMENT_TEMPLATES.values())
    for prompts in SEED_PROMPTS.values():
        texts += list(prompts)
    words: list[str] = list(NAMES) + list(ITEMS)
    seen = set(words)
    for text in texts:
        for word in text.split():
            if word.startswith("{") or word in seen:
                continue
            seen.add(word)
            words.append(word)
    if len(set(NAMES)) != len(NAMES) or len(set(ITEMS)) != len(ITEMS) or set(NAMES) & set(ITEMS):
        raise ValueError("names and items must be distinct single words")
    return words
