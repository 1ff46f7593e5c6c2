"""Learning-rate schedule of docs/spec.md §2.4, checked against the spec's numbers."""

import math

import pytest

from ratplus_mega.train.schedule import learning_rate, warmup_steps


def test_1b_recipe_warmup_peak_and_floor():
    total, peak, floor = 52452, 8e-4, 1e-6
    warmup = warmup_steps(total, 0.05)
    assert warmup == 2622  # spec §2.5 table
    lr = lambda i: learning_rate(i, total_steps=total, peak=peak, floor=floor, warmup=warmup)
    assert lr(0) == pytest.approx(peak / warmup)  # η_0 = η_max / S_w
    assert lr(warmup - 1) == pytest.approx(peak)  # end of warmup reaches the peak
    assert lr(warmup) == pytest.approx(peak)  # cosine starts at the peak
    assert lr(total - 1) == pytest.approx(floor, rel=0.05)  # ends near η_min = 1e-6
    mid = warmup + (total - warmup) // 2
    assert lr(mid) == pytest.approx(floor + (peak - floor) / 2, rel=1e-3)
    assert all(lr(i) >= lr(i + 1) for i in range(warmup, total - 1, 997))


def test_no_warmup_starts_at_peak():
    assert learning_rate(0, total_steps=476, peak=8e-5, floor=1e-6, warmup=0) == pytest.approx(8e-5)
    expected = 1e-6 + (8e-5 - 1e-6) * (1 + math.cos(math.pi * 100 / 476)) / 2
    assert learning_rate(100, total_steps=476, peak=8e-5, floor=1e-6, warmup=0) == pytest.approx(expected)


def test_step_outside_schedule_is_refused():
    with pytest.raises(ValueError, match="outside"):
        learning_rate(10, total_steps=10, peak=1e-3, floor=0.0, warmup=1)
