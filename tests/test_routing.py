"""Routing a question to document cartridges: BM25 over passages, selection order, plug-ins."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cartridges.routing import BM25Retriever, RoutingConfig, make_retriever, select

TEXTS = [
    "Halvard Industrial built the Aurora pump in 1998. Its seal is replaced every 18 months.",
    "Alarm E21 means a seal leak. Alarm E12 means the inlet pressure is low.",
    "The weather in the valley is mild in spring and wet in autumn.",
]
NAMES = ["pump", "alarms", "weather"]


class KeywordRetriever:
    """A plug-in: scores a document by how many of the query's words it contains."""

    def __init__(self, texts, bonus: float = 0.0):
        self.words = [set(t.lower().split()) for t in texts]
        self.bonus = bonus

    def scores(self, query):
        asked = set(query.lower().split())
        return np.array([len(asked & words) + self.bonus for words in self.words], float)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Who built the pump?", ("pump",)),
        ("What does alarm E21 mean?", ("alarms",)),
        ("Is autumn wet in the valley?", ("weather",)),
    ],
)
def test_bm25_routes_a_question_to_the_document_that_holds_its_words(question, expected):
    retriever = BM25Retriever(TEXTS, passage_words=8)
    assert select(retriever.scores(question), NAMES, 1) == expected


def test_a_document_scores_its_best_passage_and_its_end_is_in_one():
    long = " ".join(f"filler{i}" for i in range(200)) + " zebra"
    retriever = BM25Retriever([long, "a zebra and a zebra again"], passage_words=16)
    scores = retriever.scores("zebra")
    assert np.isfinite(scores).all() and scores[0] > 0  # the last word is in a passage
    assert retriever.scores("nothing known").tolist() == [0.0, 0.0]


def test_selection_is_in_library_order_whatever_the_ranking_and_ties_go_to_the_earlier():
    assert select(np.array([0.1, 0.9, 0.5]), NAMES, 2) == ("alarms", "weather")
    assert select(np.array([0.9, 0.1, 0.5]), NAMES, 2) == ("pump", "weather")
    assert select(np.zeros(3), NAMES, 2) == ("pump", "alarms")
    assert select(np.array([1.0, 2.0, 3.0]), NAMES, 5) == tuple(NAMES)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        select(np.zeros(3), NAMES, 0)
    with pytest.raises(ValueError, match="2 scores for 3 documents"):
        select(np.zeros(2), NAMES, 1)


def test_retrievers_are_named_or_plugged_in_and_bad_ones_are_refused():
    assert isinstance(make_retriever("bm25", TEXTS, passage_words=8), BM25Retriever)
    plugged = make_retriever("tests.test_routing:KeywordRetriever", TEXTS, bonus=1.0)
    assert plugged.scores("alarm E21 means")[1] == 4.0
    with pytest.raises(ValueError, match=r"Unknown retriever 'tfidf': choose from \['bm25'\]"):
        make_retriever("tfidf", TEXTS)
    with pytest.raises(ValueError, match="Cannot load retriever 'tests.nowhere:X'"):
        make_retriever("tests.nowhere:X", TEXTS)
    with pytest.raises(ValueError, match="'builtins:list' has no scores"):
        make_retriever("builtins:list", TEXTS)
    with pytest.raises(ValueError, match="passage_words must be >= 1, got 0"):
        BM25Retriever(TEXTS, passage_words=0)
    with pytest.raises(ValueError, match="at least one document"):
        BM25Retriever([])


def test_routing_settings_are_checked():
    assert RoutingConfig().top_k == 0  # off unless asked for
    with pytest.raises(ValidationError, match="top_k"):
        RoutingConfig(top_k=-1)
    with pytest.raises(ValidationError, match="retreiver"):
        RoutingConfig(retreiver="bm25")


def test_documents_without_a_word_to_index_are_refused():
    with pytest.raises(ValueError, match="no word to index"):
        BM25Retriever(["", "a the of"])
