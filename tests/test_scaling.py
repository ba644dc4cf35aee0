"""The scaling-law fit recovers a known law and answers with it."""

import numpy as np
import pytest

from lm.scaling import Law, fit, leave_one_size_out

TRUE = Law(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Chinchilla's fitted law
SIZES = (1e5, 3e5, 1e6, 3e6, 1e7)


def points(law: Law, noise: float = 0.0, seed: int = 0):
    """Each size at 8 checkpoints, as a ladder with intermediate validations gives them."""
    rng = np.random.default_rng(seed)
    N, D = np.meshgrid(SIZES, np.geomspace(1e6, 1e9, 8))
    N, D = N.ravel(), D.ravel()
    return N, D, law.loss(N, D) * np.exp(rng.normal(0, noise, N.size))


def test_fit_recovers_a_known_law_and_predicts_a_larger_model():
    law = fit(*points(TRUE))
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02) and law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.E == pytest.approx(TRUE.E, rel=0.05)
    assert law.loss(1e8, 2e9) == pytest.approx(TRUE.loss(1e8, 2e9), rel=0.01), "a held-out larger target"


def test_noisy_points_still_give_the_exponents_and_the_size_ranges_cover_them():
    N, D, L = points(TRUE, noise=0.005)
    ranges = leave_one_size_out(N, D, L)
    assert set(ranges) == {"E", "alpha", "beta"} and all(low <= high for low, high in ranges.values())
    assert ranges["alpha"][0] - 0.1 < TRUE.alpha < ranges["alpha"][1] + 0.1


def test_compute_optimal_split_spends_six_nd_flops_and_is_the_minimum():
    flops = 1e20
    n, d = TRUE.compute_optimal(flops)
    assert 6 * n * d == pytest.approx(flops)
    for factor in (0.5, 2.0):
        assert TRUE.loss(n, d) < TRUE.loss(n * factor, d / factor)


def test_too_few_points_fail_clearly():
    with pytest.raises(ValueError, match="4 points cannot fix a law of 5 parameters"):
        fit([1, 2, 3, 4], [1, 2, 3, 4], [3, 2, 1.5, 1.2])
