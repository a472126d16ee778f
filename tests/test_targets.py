"""Flat teacher targets: round trip and refusal of mismatched tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cartridges.synthesis.self_study import Conversation, mass_cut
from cartridges.target_store import to_examples
from cartridges.targets import (
    TargetsError,
    memorization_examples,
    one_hot,
)
from tests.training_data import to_tables


def _conversation(cid: str, token_ids: list[int], targets) -> Conversation:
    return Conversation(
        conversation_id=cid,
        chunk_id="chunk-0",
        seed_type="question",
        seed_prompt="Ask.",
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        token_ids=token_ids,
        answer_start=2,
        answer_truncated=False,
        targets=targets,
    )


CONVERSATIONS = [
    _conversation("a", [1, 2, 3, 4], [(2, [3, 7, 9], [-0.1, -2.5, -4.0]), (3, [4], [-0.01])]),
    _conversation("b", [1, 5, 6], [(2, [6, 8], [-0.5, -1.0])]),
]


def test_flat_targets_round_trip_to_dense_tensors():
    conversations, targets = to_tables(CONVERSATIONS)
    assert len(targets) == 6 and list(conversations["num_tokens"]) == [4, 3]
    examples = to_examples(conversations, targets, vocab_size=10)
    first = examples[0]
    assert first.token_ids.tolist() == [1, 2, 3, 4]
    assert first.positions.tolist() == [2, 3]
    assert first.teacher_ids.tolist() == [[3, 7, 9], [4, 0, 0]]
    expected = torch.tensor([[-0.1, -2.5, -4.0], [-0.01, -math.inf, -math.inf]])
    assert torch.allclose(first.teacher_logprobs, expected)


def test_tables_from_other_runs_are_refused():
    conversations, targets = to_tables(CONVERSATIONS)
    with pytest.raises(TargetsError, match="missing from conversations"):
        to_examples(conversations.iloc[:1], targets, vocab_size=10)
    with pytest.raises(TargetsError, match="conversations table is empty"):
        to_examples(conversations.iloc[:0], targets, vocab_size=10)
    with pytest.raises(TargetsError, match="teacher_logprobs table is empty"):
        to_examples(conversations, targets.iloc[:0], vocab_size=10)


def test_teacher_ids_outside_the_vocabulary_name_the_tokenizer():
    conversations, targets = to_tables(CONVERSATIONS)
    with pytest.raises(
        TargetsError, match="outside the student's vocabulary of 8.*different tokenizer"
    ):
        to_examples(conversations, targets, vocab_size=8)


def test_top_k_is_cut_once_the_probability_mass_is_reached():
    logprobs = np.log(np.array([[0.6, 0.3, 0.08, 0.02], [0.7, 0.3, -np.inf, -np.inf]]))
    assert mass_cut(logprobs, 0.85).tolist() == [2, 2]
    assert mass_cut(logprobs, 0.95).tolist() == [3, 2]
    assert mass_cut(logprobs, 0.5).tolist() == [1, 1]
    assert mass_cut(logprobs, 1.0).tolist() == [4, 2]  # padding (-inf) is never kept


def test_cross_entropy_and_memorization_targets_are_one_hot():
    conversations, targets = to_tables(CONVERSATIONS)
    (first, _) = one_hot(to_examples(conversations, targets, vocab_size=10))
    assert first.teacher_ids.tolist() == [[3], [4]]  # the actual tokens at positions 2 and 3
    assert first.teacher_logprobs.tolist() == [[0.0], [0.0]]
    (chunk,) = memorization_examples([[5, 6, 7], [9]])  # a one-token chunk has nothing to predict
    assert chunk.positions.tolist() == [1, 2] and chunk.teacher_ids.tolist() == [[6], [7]]
    with pytest.raises(TargetsError, match="No corpus chunk has two tokens"):
        memorization_examples([[1]])
