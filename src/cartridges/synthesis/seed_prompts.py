"""Seed prompts: the instructions that make bot A open a conversation about a chunk.

Six types, from the paper's ablation (diverse seeds beat a single generic one): each has several
phrasings of our own. Users add phrasings, or new types, through parameters.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

SEED_PROMPTS: dict[str, list[str]] = {
    "structuring": [
        "Pick one part of the information above and restate it as {format}. Keep every name, "
        "date and number exactly as written. Output only the {format}.",
        "Turn one section of the document above into {format}, preserving all identifiers, "
        "quantities and dates. Reply with the {format} alone.",
        "Choose a passage from the text above and organise its facts as {format}, field by "
        "field, without dropping any detail.",
    ],
    "summarization": [
        "Write a request asking for a summary of one specific part of the information above. "
        "Name the part explicitly (its title, subject or position) so the request is unambiguous.",
        "Ask me to summarise a particular section of the document above; say exactly which "
        "section you mean, by its heading or its topic.",
        "Request a short summary of one passage above, identifying the passage precisely.",
    ],
    "question": [
        "Write one question that tests knowledge of the information above. Include enough "
        "detail (names, dates, identifiers) that it can be answered without seeing the text. "
        "Output only the question.",
        "Ask a specific factual question about the document above. The question must make "
        "clear which part of the document it refers to. Reply with the question alone.",
        "Write a challenging question whose answer is stated in the text above; mention the "
        "entity or section it concerns so it is self-contained.",
    ],
    "use_case": [
        "Think of a practical situation in which someone would need the information above, "
        "then ask the question that person would ask. Output only the question.",
        "Imagine a user who relies on this document for their work. Write the request they "
        "would send to an assistant who knows the document well.",
        "Describe a concrete task that the information above helps with and ask for help "
        "with it, in one message.",
    ],
    "creative": [
        "Start a creative exchange inspired by the information above: ask for a short poem, "
        "story or dialogue that uses its specific facts.",
        "Write an imaginative request (a story, a letter, a song) grounded in the details of "
        "the text above.",
        "Ask for a creative piece that teaches the facts of the passage above to a newcomer.",
    ],
    "generic": [
        "Please start a conversation by asking a question about the document above.",
        "Begin a conversation about the information above.",
    ],
}

STRUCTURED_FORMATS = ("JSON", "YAML", "TOML", "XML", "plain text with one fact per line")


def seed_registry(
    extra: Mapping[str, Sequence[str]] | None = None, replace: bool = False
) -> dict[str, list[str]]:
    """The built-in phrasings plus ``extra`` ones (``replace``: the extra ones only, per type)."""
    registry = {name: list(prompts) for name, prompts in SEED_PROMPTS.items()}
    for name, prompts in (extra or {}).items():
        if not prompts:
            raise ValueError(f"Seed prompt type '{name}' is given an empty list of phrasings.")
        registry[name] = (
            list(prompts) if replace or name not in registry else registry[name] + list(prompts)
        )
    return registry


def validate_weights(weights: Mapping[str, float], registry: Mapping[str, Sequence[str]]) -> None:
    """Refuse unknown seed types and weights that cannot be sampled."""
    unknown = sorted(set(weights) - set(registry))
    if unknown:
        raise ValueError(
            f"Unknown seed prompt type(s) {unknown}; known types: {sorted(registry)}. Add "
            "phrasings for a new type under self_study.extra_seed_prompts."
        )
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(
            f"Seed type weights must be >= 0 with a positive sum, got {dict(weights)}."
        )


def sample_seed(
    rng: random.Random, weights: Mapping[str, float], registry: Mapping[str, Sequence[str]]
) -> tuple[str, str]:
    """Draw a ``(type, prompt)`` pair: the type by weight, then a phrasing uniformly."""
    names = [name for name, weight in weights.items() if weight > 0]
    name = rng.choices(names, weights=[weights[n] for n in names])[0]
    prompt = rng.choice(registry[name])
    if "{format}" in prompt:
        prompt = prompt.replace("{format}", rng.choice(STRUCTURED_FORMATS))
    return name, prompt
