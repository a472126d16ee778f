"""A synthetic "toy world" whose documents a tiny model can learn to read from its context.

No pretrained LLM is available offline, so the project trains its own small model on this world.
The world is a registry of people, each owning one item, written one record per line
(``ada owns plum .``). Around it sits a thin toy "language": question templates, self-study seed
prompts and the replies a model should give to them. Everything is generated deterministically
from a seed so that documents, questions and training data are reproducible.

Two families of question templates exist on purpose: the *ask* templates are what the model writes
when a self-study seed prompt asks it for a question, the *held-out* templates are only used to
evaluate, so an evaluation never quotes the phrasing that self-study produced.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Documents and questions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """A registry document: ordered (name, item) facts; names are unique within a document."""

    doc_id: str
    facts: tuple[tuple[str, str], ...]
    head: str = ""
    """Optional partial record before the first full record (a chunk cut mid-record)."""
    tail: str = ""
    """Optional partial record after the last full record."""

    @property
    def text(self) -> str:
        """The document as text, one record per line."""
        lines = [RECORD_TEMPLATE.format(name=n, item=i) for n, i in self.facts]
        parts = ([self.head] if self.head else []) + lines + ([self.tail] if self.tail else [])
        return "\n".join(parts)

    def item_of(self, name: str) -> str:
        """The item a name owns in this document."""
        return dict(self.facts)[name]


def make_document(
    rng: random.Random,
    n_facts: int,
    doc_id: str = "doc",
    names: Sequence[str] | None = None,
    town: int | None = None,
) -> Document:
    """Draw ``n_facts`` records of distinct residents of one town (random unless given) in random
    order, each owning a random item (items may repeat); ``names`` overrides the pool of names."""
    if names is not None:
        pool = list(names)
    else:
        pool = list(TOWNS[rng.randrange(len(TOWNS)) if town is None else town])
    if n_facts > len(pool):
        raise ValueError(f"n_facts={n_facts} exceeds the {len(pool)} available names")
    chosen = rng.sample(pool, n_facts)
    facts = tuple((n, rng.choice(ITEMS)) for n in chosen)
    return Document(doc_id=doc_id, facts=facts)


def question(name: str, template: str) -> str:
    """Fill a question template with a name."""
    return template.format(name=name)


def answer(name: str, item: str) -> str:
    """The exact expected assistant reply to any question about ``name``."""
    return ANSWER_TEMPLATE.format(name=name, item=item)


@dataclass(frozen=True)
class QAPair:
    """A question about one document fact and its exact expected reply."""

    doc_id: str
    question: str
    answer: str
    name: str
    item: str
    template: str


def heldout_questions(
    doc: Document, rng: random.Random, n: int | None = None, template: str = HELDOUT_TEMPLATES[0]
) -> list[QAPair]:
    """Questions in a held-out template: all facts (``n=None``) or ``n`` drawn with replacement."""
    names = [f[0] for f in doc.facts] if n is None else [rng.choice(doc.facts)[0] for _ in range(n)]
    return [
        QAPair(
            doc.doc_id,
            question(nm, template),
            answer(nm, doc.item_of(nm)),
            nm,
            doc.item_of(nm),
            template,
        )
        for nm in names
    ]


# --------------------------------------------------------------------------------------------------
# Self-study behaviour: seed prompt -> bot A message -> bot B reply
# --------------------------------------------------------------------------------------------------


def seed_prompt(seed_type: str, rng: random.Random) -> str:
    """One phrasing of a self-study seed prompt of the given type."""
    return rng.choice(SEED_PROMPTS[seed_type])


def seed_reply(doc: Document, seed_type: str, rng: random.Random, wrong_prob: float = 0.0) -> str:
    """What the model (as bot A) should write for a seed prompt, about random facts of ``doc``.

    ``question``/``generic`` give an ask-template question, ``use_case`` a practical request,
    the others restate one or two records (with probability ``wrong_prob`` a value is wrong,
    used to make statements the assistant must correct, not for the seed targets themselves).
    """
    name, item = rng.choice(doc.facts)
    if rng.random() < wrong_prob:
        item = rng.choice([i for i in ITEMS if i != item])
    if seed_type in ("question", "generic"):
        return question(name, rng.choice(ASK_TEMPLATES))
    if seed_type == "use_case":
        return question(name, rng.choice(USE_CASE_TEMPLATES))
    if seed_type in ("structuring", "creative"):
        return STATEMENT_TEMPLATES[seed_type].format(name=name, item=item)
    if seed_type == "summarization":
        others = [f for f in doc.facts if f[0] != name] or [(name, item)]
        name2, item2 = rng.choice(others)
        if rng.random() < wrong_prob:
            item2 = rng.choice([i for i in ITEMS if i != item2])
        return STATEMENT_TEMPLATES[seed_type].format(name=name, item=item, name2=name2, item2=item2)
    raise ValueError(f"unknown seed type {seed_type!r}")


def mentioned_names(message: str) -> list[str]:
    """Names a message mentions, in order, without repeats."""
    names = set(NAMES)
    out: list[str] = []
    for w in message.split():
        if w in names and w not in out:
            out.append(w)
    return out


def is_question(message: str) -> bool:
    """Whether a message is a question (any template) rather than a statement."""
    words = message.split()
    return (
        bool(words)
        and words[-1] in ("?", ".")
        and (words[0] in ("what", "which", "i", "tell") or (len(words) > 1 and words[1] == "has"))
    )


def assistant_reply(doc: Document, message: str) -> str:
    """The reply (bot B) should give to a user message, reading the document.

    Questions get ``name owns item``; statements get the true record(s) restated.
    """
    names = [n for n in mentioned_names(message) if n in dict(doc.facts)]
    if not names:
        raise ValueError(f"message mentions no name of document {doc.doc_id}: {message!r}")
    if is_question(message):
        return answer(names[0], doc.item_of(names[0]))
    if len(names) == 1:
        return CONFIRM_ONE.format(name=names[0], item=doc.item_of(names[0]))
    return CONFIRM_TWO.format(
        name=names[0], item=doc.item_of(names[0]), name2=names[1], item2=doc.item_of(names[1])
    )


# --------------------------------------------------------------------------------------------------
# Training conversations
# --------------------------------------------------------------------------------------------------


@dataclass
class ConversationMix:
    """Probabilities of the turn kinds in a pretraining conversation."""

    qa: float = 0.50
    seed: float = 0.30
    statement: float = 0.20
    template_weights: dict[str, float] = field(
        default_factory=lambda: {
            **{t: 0.10 for t in ASK_TEMPLATES},
            USE_CASE_TEMPLATES[0]: 0.08,
            HELDOUT_TEMPLATES[0]: 0.30,
            HELDOUT_TEMPLATES[1]: 0.22,
        }
    )
    wrong_statement_prob: float = 0.3


@dataclass
class Turn:
    """One user message and the assistant reply; ``kind`` says what it trains."""

    user: str
    assistant: str
    kind: str
    """``qa`` (answer a question), ``seed:<type>`` (write a self-study message) or ``statement``."""


def sample_turn(doc: Document, rng: random.Random, mix: ConversationMix) -> Turn:
    """Draw one training turn about ``doc`` (facts drawn with replacement)."""
    r = rng.random()
    if r < mix.qa:
        templates = list(mix.template_weights)
        tpl = rng.choices(templates, weights=[mix.template_weights[t] for t in templates])[0]
        name, item = rng.choice(doc.facts)
        return Turn(question(name, tpl), answer(name, item), "qa")
    if r < mix.qa + mix.seed:
        st = rng.choice(SEED_TYPES)
        return Turn(seed_prompt(st, rng), seed_reply(doc, st, rng), f"seed:{st}")
    st = rng.choice(("structuring", "summarization", "creative"))
    msg = seed_reply(doc, st, rng, wrong_prob=mix.wrong_statement_prob)
    return Turn(msg, assistant_reply(doc, msg), "statement")


def partial_document(doc: Document, rng: random.Random) -> Document:
    """The document as a chunk cut mid-record at either end (teaches robustness to chunking)."""
    town = next((t for t in TOWNS if doc.facts[0][0] in t), NAMES)
    others = [n for n in town if n not in dict(doc.facts)] or [
        n for n in NAMES if n not in dict(doc.facts)
    ]
    extra_n, extra_i = rng.choice(others), rng.choice(ITEMS)
    head_words = RECORD_TEMPLATE.format(name=extra_n, item=extra_i).split()
    head = " ".join(head_words[rng.randint(1, len(head_words) - 1) :]) if rng.random() < 0.5 else ""
    extra_n2 = rng.choice(
        [n for n in others if n != extra_n] or [n for n in NAMES if n not in dict(doc.facts)]
    )
    tail_words = RECORD_TEMPLATE.format(name=extra_n2, item=rng.choice(ITEMS)).split()
    tail = (
        " ".join(tail_words[: rng.randint(1, len(tail_words) - 1)])
        if not head or rng.random() < 0.5
        else ""
    )
    return Document(doc.doc_id, doc.facts, head=head, tail=tail)


def sample_conversation(
    rng: random.Random,
    n_facts: int,
    n_turns: int,
    mix: ConversationMix | None = None,
    partial_prob: float = 0.1,
    bos_before_user_prob: float = 0.2,
) -> tuple[Document, list[dict[str, str]], list[str], bool]:
    """A pretraining conversation: the document as system message, then ``n_turns`` turns.

    Returns the document, the chat messages, each assistant turn's kind, and whether a ``<bos>``
    should be inserted before the first user turn (mimics a conversation tokenised on its own
    and appended after a cartridge or a separately encoded document).
    """
    mix = mix or ConversationMix()
    doc = make_document(rng, n_facts)
    if rng.random() < partial_prob:
        doc = partial_document(doc, rng)
    messages = [{"role": "system", "content": doc.text}]
    kinds: list[str] = []
    for _ in range(n_turns):
        t = sample_turn(doc, rng, mix)
        messages += [
            {"role": "user", "content": t.user},
            {"role": "assistant", "content": t.assistant},
        ]
        kinds.append(t.kind)
    return doc, messages, kinds, rng.random() < bos_before_user_prob


# --------------------------------------------------------------------------------------------------
# Example corpus on disk
# --------------------------------------------------------------------------------------------------


def example_documents(n_docs: int = 4, n_facts: int = 32, seed: int = 0) -> list[Document]:
    """One document per town (so together they form one consistent registry: no name twice)."""
    if n_docs > len(TOWNS) or n_facts > TOWN_SIZE:
        raise ValueError(f"at most {len(TOWNS)} documents of at most {TOWN_SIZE} records")
    rng = random.Random(seed)
    return [make_document(rng, n_facts, doc_id=f"town_{k}", town=k) for k in range(n_docs)]


def write_example_corpus(
    corpus_dir: str | Path,
    questions_path: str | Path,
    n_docs: int = 4,
    n_facts: int = 32,
    seed: int = 0,
    template: str = HELDOUT_TEMPLATES[0],
) -> list[Document]:
    """Write ``<doc_id>.txt`` documents and a held-out questions JSONL (one question per fact).

    Each JSONL row: ``question``, ``answer`` (the exact full expected reply, e.g.
    ``ada owns plum``),
    ``doc_id`` (the document's file stem), plus ``name``/``item`` for lenient scoring.
    """
    corpus_dir, questions_path = Path(corpus_dir), Path(questions_path)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    questions_path.parent.mkdir(parents=True, exist_ok=True)
    docs = example_documents(n_docs, n_facts, seed)
    rng = random.Random(seed + 1)
    rows = []
    for doc in docs:
        (corpus_dir / f"{doc.doc_id}.txt").write_text(doc.text + "\n", encoding="utf-8")
        for qa in heldout_questions(doc, rng, n=None, template=template):
            rows.append(
                {
                    "question": qa.question,
                    "answer": qa.answer,
                    "doc_id": qa.doc_id,
                    "name": qa.name,
                    "item": qa.item,
                }
            )
    with questions_path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    logger.info(
        "wrote %d documents to %s and %d questions to %s",
        len(docs),
        corpus_dir,
        len(rows),
        questions_path,
    )
    return docs


def main() -> None:
    """Write the example corpus and its held-out questions (the project's default inputs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--corpus-dir", default="data/01_raw/corpus", help="where documents go")
    parser.add_argument("--questions", default="data/01_raw/questions.jsonl", help="JSONL output")
    parser.add_argument("--docs", type=int, default=1, help="number of documents")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the generated world")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    write_example_corpus(args.corpus_dir, args.questions, n_docs=args.docs, seed=args.seed)


if __name__ == "__main__":
    main()
