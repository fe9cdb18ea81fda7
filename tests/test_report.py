"""The comparison's statistics: 95% confidence intervals and paired differences to naive."""
import math

import pytest

from blendtune.report import mean_ci, paired_differences


def test_mean_ci_is_students_t_interval():
    mean, half = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([0.5, 0.5, 0.5, 0.5, 0.5]) == (0.5, 0.0)
    assert math.isinf(mean_ci([0.7])[1])


def test_paired_differences_pair_by_seed_and_mark_clear_wins():
    scores = {"naive": {0: 0.70, 1: 0.72, 2: 0.71, 3: 0.69, 4: 0.70},
              "gblend": {0: 0.75, 1: 0.76, 2: 0.74, 3: 0.75, 4: 0.76},   # +5 points on every seed
              "ogm_ge": {0: 0.72, 1: 0.70, 2: 0.71, 3: 0.70, 4: 0.69},   # noise around naive
              "late": {3: 0.90}}                                           # one shared seed: no interval
    by_label = {d.label: d for d in paired_differences(scores)}
    assert set(by_label) == {"gblend", "ogm_ge", "late"}
    g = by_label["gblend"]
    assert g.seeds == 5 and g.wins == 5 and g.mean == pytest.approx(0.048) and g.excludes_zero
    o = by_label["ogm_ge"]
    assert o.mean == pytest.approx(0.0) and not o.excludes_zero and o.wins == 2
    assert by_label["late"].seeds == 1 and not by_label["late"].excludes_zero
