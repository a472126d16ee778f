"""The learning-rate schedule of every optimiser loop in the project: warmup, then decay.

Cartridge distillation (``cartridges.training``) and the toy-world pretraining
(``cartridges.toy_world.pretrain``) both take their rate from :func:`lr_at`, so the two curves
cannot drift apart. The rate is a pure function of the step, so a resumed run continues on the
same curve without checkpointing a scheduler. Transformers' schedulers are not used: their
warmup starts at rate 0 on step 0, this one at ``peak / warmup_steps``, and changing that would
change every trained cartridge and model.
"""

from __future__ import annotations

import math

SHAPES = ("cosine", "linear", "constant")


def lr_at(
    step: int,
    total: int,
    peak: float,
    warmup_steps: int,
    shape: str = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``.

    Linear warmup to ``peak`` over ``warmup_steps`` steps, then ``shape`` decays from ``peak``
    towards ``min_ratio * peak`` at step ``total`` (``constant`` stays at ``peak``).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}.")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if shape == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    decay = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1 - min_ratio) * decay)
