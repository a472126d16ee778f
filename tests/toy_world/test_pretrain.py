"""Pretraining loop smoke test: runs, reports through ``on_step``, checkpoints and resumes."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from cartridges.modeling import pad_token_id
from cartridges.schedule import lr_at
from cartridges.toy_world.pretrain import (
    PretrainConfig,
    model_from_checkpoint,
    pretrain,
    sample_batch,
)


def _cfg(tmp_path, steps: int) -> PretrainConfig:
    return PretrainConfig(
        steps=steps,
        batch_size=4,
        n_turns=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        eval_every=1000,
        eval_questions=4,
        log_every=1,
        checkpoint_every=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        num_threads=1,
    )


def test_batches_are_deterministic(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, 1)
    a, b = sample_batch(cfg, tokenizer, 0, 7), sample_batch(cfg, tokenizer, 0, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["labels"] != -100).any() and a["values"].any()
    assert (a["input_ids"][:, -1] == pad_token_id(tokenizer)).any()  # short rows: the pad id


def test_the_rate_follows_the_shared_schedule_down_to_its_floor(tokenizer, tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path, 3), warmup_steps=1, checkpoint_dir=None)
    rates: list[float] = []
    pretrain(cfg, tokenizer, on_step=lambda info: rates.append(info.lr))
    assert rates == [lr_at(step, 3, cfg.lr, 1, min_ratio=cfg.min_lr_ratio) for step in range(3)]
    # Halfway through the decay: halfway between the peak and min_lr_ratio x the peak.
    assert rates[1:] == [cfg.lr, pytest.approx(cfg.lr * (0.1 + 0.9 * 0.5))]


def test_pretrain_checkpoint_and_resume(tokenizer, tmp_path):
    seen: list[int] = []
    pretrain(_cfg(tmp_path, 3), tokenizer, on_step=lambda info: seen.append(info.step))
    assert seen == [1, 2, 3]
    seen.clear()
    model, _ = pretrain(_cfg(tmp_path, 5), tokenizer, on_step=lambda info: seen.append(info.step))
    assert seen == [4, 5]
    restored, _, step = model_from_checkpoint(tmp_path / "ckpt", tokenizer)
    assert step == 5
    ids = sample_batch(_cfg(tmp_path, 5), tokenizer, 0, 0)["input_ids"][:1]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, restored(ids).logits)


def test_an_early_stop_waits_for_an_evaluation(tokenizer, tmp_path):
    # stop_icl 0 is met by any evaluation, but only an evaluation step can meet it.
    cfg = dataclasses.replace(
        _cfg(tmp_path, 5), curriculum=(4,), eval_every=2, checkpoint_every=100, stop_icl=0.0
    )
    seen: list[tuple[int, bool]] = []
    pretrain(cfg, tokenizer, on_step=lambda info: seen.append((info.step, bool(info.metrics))))
    assert seen == [(1, False), (2, True)]
    assert model_from_checkpoint(tmp_path / "ckpt", tokenizer)[2] == 2  # saved where it stopped


def test_multi_document_contexts_hold_distinct_towns_separated_by_a_blank_line(tokenizer):
    from cartridges.context import DOCUMENT_SEPARATOR
    from cartridges.toy_world import conversations, language

    rng = random.Random(3)
    registry, messages, _, _ = conversations.sample_conversation(rng, 8, 4, n_documents=3)
    documents = messages[0]["content"].split(DOCUMENT_SEPARATOR)
    assert len(documents) == 3 and len(registry.facts) == 24
    towns = [
        {t for t, town in enumerate(language.TOWNS) if line.split()[0] in town}
        for document in documents
        for line in document.splitlines()[:1]
    ]
    assert len(set().union(*towns)) == 3  # one town per document, no name twice
    for turn in messages[1::2]:  # every question names someone of the context
        names = [w for w in turn["content"].split() if w in language.NAMES]
        assert all(name in dict(registry.facts) for name in names)


def test_a_run_fine_tunes_from_a_saved_model(tokenizer, tmp_path):
    base, _ = pretrain(dataclasses.replace(_cfg(tmp_path, 1), checkpoint_dir=None), tokenizer)
    base.save_pretrained(tmp_path / "base")
    cfg = dataclasses.replace(
        _cfg(tmp_path, 1),
        checkpoint_dir=None,
        init_from=str(tmp_path / "base"),
        max_documents=2,
        multi_document_prob=1.0,
        lr=0.0,  # no update: the weights are the saved ones
        warmup_steps=0,
    )
    tuned, _ = pretrain(cfg, tokenizer)
    assert all(
        torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters(), strict=True)
    )
    batch = sample_batch(cfg, tokenizer, 0, 0)
    assert (
        batch["input_ids"].shape[1]
        > sample_batch(_cfg(tmp_path, 1), tokenizer, 0, 0)["input_ids"].shape[1]
    )  # two registries per context: longer rows
