"""Companion training: a cartridge read beside another frozen prefix, so that it composes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cartridges.batching import make_batch
from cartridges.cartridge import compose
from cartridges.context import corpus_context
from cartridges.initialization import from_token_ids
from cartridges.objective import CartridgeStudent
from cartridges.recipe import Companions
from cartridges.training import TrainConfig, train_cartridge
from tests.conftest import CORPUS
from tests.training_data import setting


@pytest.fixture(scope="module")
def data():
    return setting()


def _batch(examples, rows, prefix_len):
    return make_batch(examples, [rows], 0, prefix_len, torch.float32)


def _loss(model, prefix, batch):
    """The batch's loss with ``prefix`` (a plain cartridge) as the whole cache."""
    return CartridgeStudent(model, prefix).loss_sum(batch)


def test_a_companion_batch_reads_the_cartridge_beside_it_exactly_as_composed(data):
    model, document, examples, cartridge = data
    companion = from_token_ids(model, document[20:29], num_frozen_tokens=9)
    student = CartridgeStudent(model, cartridge, companions=(companion,), companion_prob=1.0)
    batch = _batch(examples, [0, 1, 2], cartridge.num_tokens)
    chosen, first = student._companion(batch)
    assert chosen is companion
    order = [companion, cartridge] if first else [cartridge, companion]
    expected = _loss(model, compose(order), batch)
    loss = student.loss_sum(batch)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # gradients reach the cartridge, and only it
    assert cartridge.trainable_keys.grad is not None
    assert not any(t.requires_grad for t in companion.parameters())
    cartridge.zero_grad()
    # Held-out KL is the cartridge alone.
    alone = CartridgeStudent(model, cartridge).loss_sum(batch, kl=True)
    torch.testing.assert_close(student.loss_sum(batch, kl=True), alone)


def test_companion_choices_are_a_function_of_the_batch_and_the_share_holds(data):
    model, document, examples, cartridge = data
    companions = tuple(
        from_token_ids(model, document[k : k + 5], num_frozen_tokens=5) for k in (0, 10, 20)
    )
    student = CartridgeStudent(model, cartridge, companions=companions, companion_prob=0.5, seed=3)
    again = CartridgeStudent(model, cartridge, companions=companions, companion_prob=0.5, seed=3)
    batches = [_batch(examples, [i], cartridge.num_tokens) for i in range(len(examples))]
    draws = [student._companion(batch) for batch in batches]
    assert draws == [again._companion(batch) for batch in batches]  # resumable, same on ranks
    used = [companion for companion, _ in draws if companion is not None]
    assert 0.2 < len(used) / len(draws) < 0.8
    assert len({id(c) for c in used}) > 1 and {first for c, first in draws if c} == {True, False}
    never = CartridgeStudent(model, cartridge, companions=companions, companion_prob=0.0)
    assert all(never._companion(batch) == (None, False) for batch in batches)


def test_companions_are_chunks_of_the_corpus_in_context_at_most_the_cartridges_size(tiny):
    model, tokenizer = tiny
    chunks = [CORPUS[:60], CORPUS[60:120], CORPUS[:60], CORPUS[100:]]
    source = Companions(chunks, "About:\n{chunk}")
    prefixes = source.prefixes(model, tokenizer, size=12, count=8, seed=0)
    assert len(prefixes) == 3  # distinct chunks only
    firsts = set()
    for prefix in prefixes:
        assert prefix.num_tokens == 12 and prefix.num_frozen_tokens == 12
        firsts.add(tuple(prefix.keys[0, 0, -1].tolist()))
    assert len(firsts) == 3
    context = corpus_context([CORPUS[:60]], tokenizer, "About:\n{chunk}")
    expected = from_token_ids(model, context.ids[:12], num_frozen_tokens=12)
    assert any(torch.equal(p.keys, expected.keys) for p in prefixes)
    again = source.prefixes(model, tokenizer, size=12, count=2, seed=0)
    assert [p.keys.sum() for p in again] == [p.keys.sum() for p in prefixes[:2]]


def test_training_with_companions_runs_and_bad_settings_are_refused(data):
    model, document, examples, cartridge = data
    companion = from_token_ids(model, document[20:29], num_frozen_tokens=9)
    config = TrainConfig(
        learning_rate=0.05,
        global_batch_size=4,
        micro_batch_size=4,
        max_steps=3,
        warmup_steps=1,
        companion_prob=0.5,
    )
    trained, history = train_cartridge(
        model, cartridge.to(torch.float32), examples, config, 0, companions=[companion]
    )
    assert len(history) == 3 and trained is cartridge
    with pytest.raises(ValueError, match="no companion prefix was given"):
        train_cartridge(model, cartridge, examples, config, 0)
    with pytest.raises(ValueError, match=r"companion_prob must be in \[0, 1\]"):
        TrainConfig(companion_prob=1.5)
    with pytest.raises(ValueError, match="companion_prob needs padded batches"):
        TrainConfig(companion_prob=0.5, pack_length=256)


def test_a_distill_run_without_chunks_for_companions_is_refused(tiny):
    from cartridges.distillation import DistillConfig, distill
    from cartridges.recipe import Split

    model, tokenizer = tiny
    cartridge = from_token_ids(model, tokenizer("hello there")["input_ids"])
    config = DistillConfig(train=TrainConfig(companion_prob=0.5, max_steps=1))
    with pytest.raises(ValueError, match="pass the corpus's chunks as companions"):
        distill(model, tokenizer, cartridge, Split([], [], []), config, pd.DataFrame())
