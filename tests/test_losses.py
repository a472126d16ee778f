"""Distillation losses against hand-computed references."""

from __future__ import annotations

import math

import torch

from cartridges.losses import kl_from_topk, topk_distillation_loss


def test_topk_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    ids = torch.tensor([[0, 1]])
    teacher = torch.tensor([[math.log(0.7), math.log(0.2)]])
    student = torch.log_softmax(logits, dim=-1)[0]
    expected = -(0.7 * student[0] + 0.2 * student[1])
    assert torch.allclose(topk_distillation_loss(logits, ids, teacher), expected)


def test_padded_entries_contribute_nothing():
    logits = torch.randn(4, 10)
    ids = torch.tensor([[1, 2, 0]] * 4)
    teacher = torch.tensor([[math.log(0.6), math.log(0.3), -math.inf]] * 4)
    unpadded = topk_distillation_loss(logits, ids[:, :2], teacher[:, :2])
    assert torch.allclose(topk_distillation_loss(logits, ids, teacher), unpadded)


def test_no_positions_gives_zero_with_a_gradient():
    logits = torch.randn(0, 10, requires_grad=True)
    loss = topk_distillation_loss(logits, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    loss.backward()
    assert loss.item() == 0.0


def test_kl_is_exact_with_the_full_distribution_and_zero_at_the_teacher():
    teacher_logits, student_logits = torch.randn(5, 30), torch.randn(5, 30)
    teacher = torch.log_softmax(teacher_logits, dim=-1)
    values, ids = teacher.topk(30)
    full = (teacher.exp() * (teacher - torch.log_softmax(student_logits, dim=-1))).sum(-1).mean()
    assert torch.allclose(kl_from_topk(student_logits, ids, values), full, atol=1e-5)
    values, ids = teacher.topk(4)
    assert kl_from_topk(student_logits, ids, values) > 0
    assert abs(kl_from_topk(teacher_logits, ids, values).item()) < 1e-6
