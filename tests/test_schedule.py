"""The learning-rate schedule: linear warm-up, then cosine decay to a fraction of the peak."""
import math

import pytest

from shared.training.loops import learning_rate


def test_warm_up_then_cosine_from_the_warm_up_on():
    rates = [learning_rate(step, 110, 1.0, 10, 0.1) for step in range(110)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == 1.0 and rates[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_min_ratio_one_is_constant():
    assert {learning_rate(step, 50, 2e-3, 5, 1.0) for step in range(5, 50)} == {2e-3}
