"""The one learning-rate schedule: warmup, then cosine, linear or constant decay to a floor."""

from __future__ import annotations

import math

import pytest

from cartridges.schedule import lr_at


def test_warmup_reaches_the_peak_on_its_last_step_without_a_step_at_zero():
    assert [lr_at(step, 100, 1.0, 4) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(0, 10, 0.5, 0) == 0.5  # no warmup


@pytest.mark.parametrize(
    ("shape", "halfway", "last"),
    [("cosine", 0.5, 0.5 * (1 + math.cos(math.pi * 9 / 10))), ("linear", 0.5, 0.1)],
)
def test_decay_shapes_after_warmup(shape, halfway, last):
    # 10 steps of warmup, then 10 of decay: step 15 is halfway, step 19 the last one run.
    assert lr_at(15, 20, 1.0, 10, shape) == pytest.approx(halfway)
    assert lr_at(19, 20, 1.0, 10, shape) == pytest.approx(last)
    assert lr_at(10, 20, 1.0, 10, shape) == 1.0


def test_constant_stays_at_the_peak_and_the_floor_is_a_ratio_of_it():
    assert {lr_at(step, 20, 0.3, 2, "constant") for step in range(2, 20)} == {0.3}
    # The toy-world pretraining decays to min_ratio * peak, reached at (and kept after) the end.
    assert lr_at(100, 100, 2.0, 10, min_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(150, 100, 2.0, 10, "linear", min_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(55, 100, 2.0, 10, min_ratio=0.1) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))


def test_an_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="one of cosine, linear, constant, got 'step'"):
        lr_at(0, 10, 1.0, 0, "step")
