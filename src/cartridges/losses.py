"""Distillation losses: pure tensor functions, computed in float32, safe under masking."""

from __future__ import annotations

import torch


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy from the teacher's sparse top-k distribution to the student, per position.

    ``loss_i = - sum_{v in topk_i} p_teacher(v) * log p_student(v)``, averaged over positions.
    Padding entries carry ``teacher_logprobs = -inf`` (probability 0) and contribute nothing.
    With a one-hot teacher it is the token cross-entropy.

    Args:
        student_logits: ``[N, V]`` logits at the N distilled positions.
        teacher_ids: ``[N, K]`` token ids of the teacher's top-k.
        teacher_logprobs: ``[N, K]`` their log-probabilities (``-inf`` for padding).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    picked = student_logprobs.gather(-1, teacher_ids)  # [N, K]
    teacher_probs = teacher_logprobs.float().exp()  # [N, K], 0 where padded
    per_position = -(teacher_probs * picked).nansum(-1)  # [N]
    return per_position.mean()


def kl_from_topk(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's kept entries plus one bucket for the rest.

    The teacher is known only on its top-k; lumping the remaining mass of both distributions
    into a single "other" outcome gives a true KL between two coarse-grained distributions:
    non-negative, and zero when the student matches the teacher on the kept entries.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids)  # [N, K]
    teacher = teacher_logprobs.float()  # [N, K], -inf where padded
    kept = teacher.exp() > 0
    teacher_probs = teacher.exp()
    terms = torch.where(kept, teacher_probs * (teacher - student), 0.0).sum(-1)  # [N]
    teacher_rest = (1 - teacher_probs.sum(-1)).clamp_min(0)
    student_rest = (1 - torch.where(kept, student.exp(), 0.0).sum(-1)).clamp_min(1e-12)
    rest = torch.where(
        teacher_rest > 1e-12,
        teacher_rest * (teacher_rest.clamp_min(1e-12).log() - student_rest.log()),
        0.0,
    )
    return (terms + rest).mean()
