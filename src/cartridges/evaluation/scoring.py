"""Scores of generated answers: exact match, token F1 (SQuAD-style), option accuracy, chrF.

Pure functions of strings; which questions they apply to is the tasks' business.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from difflib import SequenceMatcher

from sacrebleu.metrics import CHRF

from cartridges.evaluation.questions import LETTERS

_PUNCTUATION = set(string.punctuation)
# "B", "B.", "(B)", "B) text", "Answer: B", "the answer is (B)", "option B": a letter standing
# alone, at the start or after "answer"/"option"; "A seal leak" is not the letter A.
_LETTER = re.compile(
    r"^(?:.*?\b(?:answer(?: is)?|option)\s*:?\s*)?\(?([A-Z])(?:[).:,]|$)", re.IGNORECASE
)


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation, articles and extra whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def choose_option(generation: str, options: Sequence[str]) -> int:
    """The option a free-form answer picks, as in the paper's LongHealth scoring.

    A letter standing alone (``"B"``, ``"(B)"``, ``"Answer: B."``) picks its option; otherwise the
    option whose normalised text is closest to the answer's (character similarity) is taken, so
    that an answer restating the option's text is still understood.
    """
    answer = normalise_answer(generation)
    exact = [i for i, o in enumerate(options) if normalise_answer(o) == answer]
    if exact:
        return exact[0]
    match = _LETTER.match(generation.strip())
    if match and LETTERS.index(match.group(1).upper()) < len(options):
        return LETTERS.index(match.group(1).upper())
    similarity = [SequenceMatcher(None, answer, normalise_answer(o)).ratio() for o in options]
    return max(range(len(options)), key=similarity.__getitem__)


def mean(values: Iterable[float | bool]) -> float:
    """The mean of per-item scores; ``nan`` for none."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu's defaults: character 6-grams, beta 2), 0-100."""
    return CHRF().corpus_score(list(predictions), [list(references)]).score
