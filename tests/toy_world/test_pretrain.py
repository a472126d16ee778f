"""Pretraining loop smoke test: runs, reports through ``on_step``, checkpoints and resumes."""

from __future__ import annotations

import torch

from cartridges.toy_world.pretrain import (
    PretrainConfig,
    make_batch,
    model_from_checkpoint,
    pretrain,
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
    a, b = make_batch(cfg, tokenizer, 0, 7), make_batch(cfg, tokenizer, 0, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["labels"] != -100).any() and a["values"].any()


def test_pretrain_checkpoint_and_resume(tokenizer, tmp_path):
    seen: list[int] = []
    pretrain(_cfg(tmp_path, 3), tokenizer, on_step=lambda info: seen.append(info.step))
    assert seen == [1, 2, 3]
    seen.clear()
    model, _ = pretrain(_cfg(tmp_path, 5), tokenizer, on_step=lambda info: seen.append(info.step))
    assert seen == [4, 5]
    restored, _, step = model_from_checkpoint(tmp_path / "ckpt", tokenizer)
    assert step == 5
    ids = make_batch(_cfg(tmp_path, 5), tokenizer, 0, 0)["input_ids"][:1]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, restored(ids).logits)
