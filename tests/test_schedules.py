import math

import pytest

from optim.schedules import Schedule

D = 1_000_000  # budget in tokens


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_warmup_is_linear_in_tokens(kind):
    s = Schedule(kind=kind, warmup=0.1, min_lr_ratio=0.1)
    assert s.factor(25_000, D) == pytest.approx(0.25)
    assert s.factor(100_000, D) == pytest.approx(1.0)


def test_cosine_values():
    s = Schedule(kind="cosine", warmup=0.1, min_lr_ratio=0.1)
    assert s.factor(550_000, D) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert s.factor(325_000, D) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.factor(D, D) == pytest.approx(0.1)


def test_linear_values():
    s = Schedule(kind="linear", warmup=0.0, min_lr_ratio=0.0)
    assert s.factor(250_000, D) == pytest.approx(0.75)
    assert s.factor(D, D) == pytest.approx(0.0)


def test_wsd_values():
    s = Schedule(kind="wsd", warmup=0.05, decay=0.2, min_lr_ratio=0.0)
    assert s.factor(500_000, D) == 1.0
    assert s.factor(800_000, D) == 1.0
    assert s.factor(900_000, D) == pytest.approx(0.5)
    assert s.factor(D, D) == pytest.approx(0.0)
    assert s.factor(2 * D, D) == pytest.approx(0.0)  # past the budget: the final value


def test_constant_values():
    assert Schedule(kind="constant", warmup=0.0).factor(123_456, D) == 1.0


def test_bad_schedules_name_what_is_valid():
    with pytest.raises(ValueError, match=r"unknown schedule 'exp'; valid: \['constant', 'cosine', 'linear', 'wsd'\]"):
        Schedule(kind="exp")
    with pytest.raises(ValueError, match=r"schedule.warmup=1.5 must be a fraction"):
        Schedule(warmup=1.5)
    with pytest.raises(ValueError, match=r"schedule.decay=0.99 must be in \(0, 1 - warmup\]"):
        Schedule(kind="wsd", warmup=0.05, decay=0.99)
