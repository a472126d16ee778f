"""Registries (the toy world's facts) and the questions asked about them.

A :class:`Registry` is a set of ``(name, item)`` records about one town; its :attr:`~Registry.text`
is the document a model reads (one record per line). It is not :class:`cartridges.corpus.Document`,
which is any file of a user's corpus: a registry knows its facts, so every answer about it can be
checked exactly. Everything is drawn from a caller's ``random.Random``, so it is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from cartridges.toy_world.language import (
    ANSWER_TEMPLATE,
    HELDOUT_TEMPLATES,
    ITEMS,
    NAMES,
    RECORD_TEMPLATE,
    TOWNS,
)


@dataclass(frozen=True)
class Registry:
    """Ordered (name, item) facts written as one document; names are unique within it."""

    doc_id: str
    facts: tuple[tuple[str, str], ...]
    head: str = ""
    """Optional partial record before the first full record (a chunk cut mid-record)."""
    tail: str = ""
    """Optional partial record after the last full record."""

    @property
    def text(self) -> str:
        """The registry as a document, one record per line."""
        lines = [RECORD_TEMPLATE.format(name=n, item=i) for n, i in self.facts]
        parts = ([self.head] if self.head else []) + lines + ([self.tail] if self.tail else [])
        return "\n".join(parts)

    def item_of(self, name: str) -> str:
        """The item a name owns in this registry."""
        return dict(self.facts)[name]


def make_registry(
    rng: random.Random,
    n_facts: int,
    doc_id: str = "doc",
    names: Sequence[str] | None = None,
    town: int | None = None,
) -> Registry:
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
    return Registry(doc_id=doc_id, facts=facts)


def partial_registry(registry: Registry, rng: random.Random) -> Registry:
    """The registry as a chunk cut mid-record at either end (teaches robustness to chunking)."""
    owners = dict(registry.facts)
    town = next((t for t in TOWNS if registry.facts[0][0] in t), NAMES)
    others = [n for n in town if n not in owners] or [n for n in NAMES if n not in owners]
    extra_n, extra_i = rng.choice(others), rng.choice(ITEMS)
    head_words = RECORD_TEMPLATE.format(name=extra_n, item=extra_i).split()
    head = " ".join(head_words[rng.randint(1, len(head_words) - 1) :]) if rng.random() < 0.5 else ""
    extra_n2 = rng.choice(
        [n for n in others if n != extra_n] or [n for n in NAMES if n not in owners]
    )
    tail_words = RECORD_TEMPLATE.format(name=extra_n2, item=rng.choice(ITEMS)).split()
    tail = (
        " ".join(tail_words[: rng.randint(1, len(tail_words) - 1)])
        if not head or rng.random() < 0.5
        else ""
    )
    return Registry(registry.doc_id, registry.facts, head=head, tail=tail)


def question(name: str, template: str) -> str:
    """Fill a question template with a name."""
    return template.format(name=name)


def answer(name: str, item: str) -> str:
    """The exact expected assistant reply to any question about ``name``."""
    return ANSWER_TEMPLATE.format(name=name, item=item)


@dataclass(frozen=True)
class QAPair:
    """A question about one registry fact and its exact expected reply."""

    doc_id: str
    question: str
    answer: str
    name: str
    item: str
    template: str


def heldout_questions(
    registry: Registry,
    rng: random.Random,
    n: int | None = None,
    template: str = HELDOUT_TEMPLATES[0],
) -> list[QAPair]:
    """Questions in a held-out template: all facts (``n=None``) or ``n`` drawn with replacement."""
    facts = registry.facts
    names = [f[0] for f in facts] if n is None else [rng.choice(facts)[0] for _ in range(n)]
    return [
        QAPair(
            registry.doc_id,
            question(name, template),
            answer(name, registry.item_of(name)),
            name,
            registry.item_of(name),
            template,
        )
        for name in names
    ]
