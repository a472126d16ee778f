"""How a reader of the toy world behaves in a conversation, and the pretraining conversations.

Self-study has two roles: bot A writes a message for a seed prompt (:func:`seed_reply`), bot B
answers it from the registry (:func:`assistant_reply`). Both are exact functions here, so the
pretraining data teaches the model precisely the behaviour self-study later relies on, and an
evaluation can score a reply by equality. Sampling is by the caller's ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cartridges.context import DOCUMENT_SEPARATOR
from cartridges.toy_world.language import (
    ASK_TEMPLATES,
    CONFIRM_ONE,
    CONFIRM_TWO,
    HELDOUT_TEMPLATES,
    ITEMS,
    NAMES,
    SEED_PROMPTS,
    SEED_TYPES,
    STATEMENT_TEMPLATES,
    TOWNS,
    USE_CASE_TEMPLATES,
)
from cartridges.toy_world.registry import (
    Registry,
    answer,
    make_registry,
    partial_registry,
    question,
)

# --------------------------------------------------------------------------------------------------
# Self-study behaviour: seed prompt -> bot A message -> bot B reply
# --------------------------------------------------------------------------------------------------


def seed_prompt(seed_type: str, rng: random.Random) -> str:
    """One phrasing of a self-study seed prompt of the given type."""
    return rng.choice(SEED_PROMPTS[seed_type])


def seed_reply(
    registry: Registry, seed_type: str, rng: random.Random, wrong_prob: float = 0.0
) -> str:
    """What the model (as bot A) should write for a seed prompt, about random facts of ``registry``.

    ``question``/``generic`` give an ask-template question, ``use_case`` a practical request,
    the others restate one or two records (with probability ``wrong_prob`` a value is wrong,
    used to make statements the assistant must correct, not for the seed targets themselves).
    """
    name, item = rng.choice(registry.facts)
    if rng.random() < wrong_prob:
        item = rng.choice([i for i in ITEMS if i != item])
    if seed_type in ("question", "generic"):
        return question(name, rng.choice(ASK_TEMPLATES))
    if seed_type == "use_case":
        return question(name, rng.choice(USE_CASE_TEMPLATES))
    if seed_type in ("structuring", "creative"):
        return STATEMENT_TEMPLATES[seed_type].format(name=name, item=item)
    if seed_type == "summarization":
        others = [f for f in registry.facts if f[0] != name] or [(name, item)]
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


def assistant_reply(registry: Registry, message: str) -> str:
    """The reply (bot B) should give to a user message, reading the registry.

    Questions get ``name owns item``; statements get the true record(s) restated.
    """
    names = [n for n in mentioned_names(message) if n in dict(registry.facts)]
    if not names:
        raise ValueError(f"message mentions no name of registry {registry.doc_id}: {message!r}")
    if is_question(message):
        return answer(names[0], registry.item_of(names[0]))
    if len(names) == 1:
        return CONFIRM_ONE.format(name=names[0], item=registry.item_of(names[0]))
    return CONFIRM_TWO.format(
        name=names[0],
        item=registry.item_of(names[0]),
        name2=names[1],
        item2=registry.item_of(names[1]),
    )


# --------------------------------------------------------------------------------------------------
# Pretraining conversations
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


def sample_turn(registry: Registry, rng: random.Random, mix: ConversationMix) -> Turn:
    """Draw one training turn about ``registry`` (facts drawn with replacement)."""
    r = rng.random()
    if r < mix.qa:
        templates = list(mix.template_weights)
        tpl = rng.choices(templates, weights=[mix.template_weights[t] for t in templates])[0]
        name, item = rng.choice(registry.facts)
        return Turn(question(name, tpl), answer(name, item), "qa")
    if r < mix.qa + mix.seed:
        st = rng.choice(SEED_TYPES)
        return Turn(seed_prompt(st, rng), seed_reply(registry, st, rng), f"seed:{st}")
    st = rng.choice(("structuring", "summarization", "creative"))
    msg = seed_reply(registry, st, rng, wrong_prob=mix.wrong_statement_prob)
    return Turn(msg, assistant_reply(registry, msg), "statement")


def sample_conversation(
    rng: random.Random,
    n_facts: int,
    n_turns: int,
    mix: ConversationMix | None = None,
    partial_prob: float = 0.1,
    bos_before_user_prob: float = 0.2,
    n_documents: int = 1,
) -> tuple[Registry, list[dict[str, str]], list[str], bool]:
    """A pretraining conversation: the registry as system message, then ``n_turns`` turns.

    With ``n_documents > 1`` the system message holds that many registries of distinct towns,
    separated by a blank line as a corpus in context is, and the turns ask about any of them.

    Returns the registry (all documents' records), the chat messages, each assistant turn's
    kind, and whether a ``<bos>`` should be inserted before the first user turn (mimics a
    conversation tokenised on its own and appended after a cartridge or a separately encoded
    document).
    """
    mix = mix or ConversationMix()
    if n_documents > 1:
        towns = rng.sample(range(len(TOWNS)), n_documents)
        parts = [make_registry(rng, n_facts, town=town) for town in towns]
        facts = tuple(fact for part in parts for fact in part.facts)
        registry = Registry("documents", facts)
        text = DOCUMENT_SEPARATOR.join(part.text for part in parts)
    else:
        registry = make_registry(rng, n_facts)
        if rng.random() < partial_prob:
            registry = partial_registry(registry, rng)
        text = registry.text
    messages = [{"role": "system", "content": text}]
    kinds: list[str] = []
    for _ in range(n_turns):
        t = sample_turn(registry, rng, mix)
        messages += [
            {"role": "user", "content": t.user},
            {"role": "assistant", "content": t.assistant},
        ]
        kinds.append(t.kind)
    return registry, messages, kinds, rng.random() < bos_before_user_prob
