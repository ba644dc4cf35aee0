"""lm/stats.py: intervals that keep their coverage on correlated windows, seed aggregation, and verdicts."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lm.stats import Estimate, batch_means, over_seeds, verdict, with_noise_floor


def correlated(rng: np.random.Generator, n: int, rho: float = 0.9) -> np.ndarray:
    """AR(1) noise around 0 with unit marginal variance: neighbouring windows of one text move together."""
    x = np.empty(n)
    x[0] = rng.standard_normal()
    shocks = rng.standard_normal(n) * np.sqrt(1 - rho**2)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + shocks[i]
    return x


def test_batch_means_keeps_its_coverage_on_correlated_windows_where_single_windows_do_not():
    rng = np.random.default_rng(0)
    covered_batches = covered_naive = 0
    trials = 300
    for _ in range(trials):
        diffs = correlated(rng, 1600)
        est = batch_means(diffs)
        covered_batches += est.low < 0 < est.high
        naive = scipy_stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
        covered_naive += abs(diffs.mean()) < naive
    assert 0.88 <= covered_batches / trials <= 0.99, "about the nominal 95 %"
    assert covered_naive / trials < 0.6, "an interval from single windows is far too narrow here"


def test_batch_means_of_independent_windows_is_the_usual_t_interval_in_the_limit():
    diffs = np.random.default_rng(1).normal(0.1, 1.0, 10_000)
    est = batch_means(diffs)
    assert est.mean == pytest.approx(diffs.mean()) and est.dof == 99
    assert est.half_width == pytest.approx(1.96 / 100, rel=0.2)
    with pytest.raises(ValueError, match="3 paired windows are too few"):
        batch_means([0.1, 0.2, 0.3])


def test_three_seeds_or_more_give_a_t_interval_over_the_seeds_means():
    per_seed = [Estimate(m, 0.01, 0.95, 30) for m in (0.1, 0.2, 0.3)]
    est = over_seeds(per_seed)
    expected = scipy_stats.t.ppf(0.975, 2) * np.std([0.1, 0.2, 0.3], ddof=1) / np.sqrt(3)
    assert est.mean == pytest.approx(0.2) and est.half_width == pytest.approx(expected) and est.dof == 2


def test_fewer_seeds_pool_the_within_seed_errors_and_a_noise_floor_widens_them():
    q = scipy_stats.t.ppf(0.975, 30)
    per_seed = [Estimate(0.1, q * 0.03, 0.95, 30), Estimate(0.2, q * 0.04, 0.95, 30)]
    est = over_seeds(per_seed)
    assert est.mean == pytest.approx(0.15) and est.dof == 60
    assert est.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 60) * 0.025)  # sqrt(.03^2 + .04^2) / 2
    wider = with_noise_floor(est, seed_sd=0.05, seeds=2)
    assert wider.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 60) * np.hypot(0.025, 0.05))


@pytest.mark.parametrize(
    ("mean", "half_width", "test", "margin", "direction", "expected"),
    [
        (-0.05, 0.02, "superiority", 0.0, "lower", "REPRODUCED"),  # the loss drops, beyond doubt
        (-0.05, 0.02, "superiority", 0.04, "lower", "INCONCLUSIVE"),  # by 0.03 to 0.07: maybe not 0.04
        (-0.01, 0.005, "superiority", 0.04, "lower", "NOT REPRODUCED"),  # surely less than the claimed 0.04
        (0.03, 0.02, "superiority", 0.0, "lower", "NOT REPRODUCED"),  # it got worse
        (0.03, 0.02, "superiority", 0.0, "higher", "REPRODUCED"),
        (0.001, 0.004, "equivalence", 0.01, "lower", "REPRODUCED"),  # within +-0.01
        (0.008, 0.004, "equivalence", 0.01, "lower", "INCONCLUSIVE"),
        (0.05, 0.01, "equivalence", 0.01, "lower", "NOT REPRODUCED"),
    ],
)
def test_verdicts_judge_the_interval_not_the_point(mean, half_width, test, margin, direction, expected):
    assert verdict(Estimate(mean, half_width, 0.95, 10), test, margin, direction) == expected


def test_a_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin is a size"):
        verdict(Estimate(0.0, 0.1, 0.95, 10), "equivalence", -0.1)
