"""Is a difference between two runs real? Paired per-window loss differences with intervals that allow for
correlated neighbouring windows (batch means), aggregation over seeds, a superiority or equivalence (TOST) test
against a margin, and the verdict a recipe prints."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Verdict = Literal["REPRODUCED", "NOT REPRODUCED", "INCONCLUSIVE"]


@dataclass(frozen=True)
class Estimate:
    """A mean difference and the half-width of its two-sided interval at `confidence`."""

    mean: float
    half_width: float
    confidence: float
    dof: int
    """Degrees of freedom of the t quantile the half-width uses."""

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def _t_half_width(standard_error: float, dof: int, confidence: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, dof)) * standard_error


def batch_means(diffs: Sequence[float], confidence: float = 0.95, batches: int = 0) -> Estimate:
    """The mean of paired per-window differences, in order, with a t-interval from the means of `batches`
    contiguous blocks (default: the square root of the windows, at least 2). Neighbouring windows cut from the
    same documents are correlated, so an interval from single windows is too narrow; means of long enough blocks
    are close to independent."""
    diffs = np.asarray(diffs, dtype=np.float64)
    batches = batches or max(2, math.isqrt(len(diffs)))
    if len(diffs) < 2 * batches:
        raise ValueError(f"{len(diffs)} paired windows are too few for {batches} batches of at least 2")
    means = np.array([block.mean() for block in np.array_split(diffs, batches)])
    standard_error = means.std(ddof=1) / math.sqrt(batches)
    dof = batches - 1
    return Estimate(float(diffs.mean()), _t_half_width(standard_error, dof, confidence), confidence, dof)


def over_seeds(per_seed: Sequence[Estimate], confidence: float = 0.95) -> Estimate:
    """One estimate from each seed's. From 3 seeds on, a t-interval over the seeds' means (seed-to-seed variance
    is then measured); with fewer, the mean of the means with the within-seed errors pooled, which leaves seed
    variance out: a recipe adds it from its noise floor (with_noise_floor)."""
    if not per_seed:
        raise ValueError("no seed to aggregate")
    k = len(per_seed)
    means = np.array([e.mean for e in per_seed])
    if k >= 3:
        return Estimate(
            float(means.mean()),
            _t_half_width(means.std(ddof=1) / math.sqrt(k), k - 1, confidence),
            confidence,
            k - 1,
        )
    errors = [e.half_width / float(stats.t.ppf(0.5 + e.confidence / 2, e.dof)) for e in per_seed]
    standard_error = math.sqrt(sum(se**2 for se in errors)) / k
    dof = sum(e.dof for e in per_seed)
    return Estimate(float(means.mean()), _t_half_width(standard_error, dof, confidence), confidence, dof)


def with_noise_floor(estimate: Estimate, seed_sd: float, seeds: int) -> Estimate:
    """The estimate's interval widened by seed-to-seed variance measured elsewhere (the noise-floor recipe's
    standard deviation of a run's mean loss between seeds, for `seeds` seeds of each arm)."""
    q = float(stats.t.ppf(0.5 + estimate.confidence / 2, estimate.dof))
    standard_error = math.hypot(estimate.half_width / q, seed_sd * math.sqrt(2 / seeds))
    return Estimate(estimate.mean, q * standard_error, estimate.confidence, estimate.dof)


def pair_verdict(delta: float, half_width: float) -> str:
    """A paired difference a − b with the half-width of its interval: "a better" when the whole interval is below
    zero, "b better" when above, else "within noise" (evaluate's comparisons)."""
    return "a better" if delta + half_width < 0 else "b better" if delta - half_width > 0 else "within noise"


def verdict(
    estimate: Estimate,
    test: Literal["superiority", "equivalence"],
    margin: float,
    direction: Literal["lower", "higher"] = "lower",
) -> Verdict:
    """The claim judged on the interval, never the point estimate.

    superiority: the arm's difference is beyond `margin` in `direction` (lower: the loss drops by more than
    margin). REPRODUCED when the whole interval is beyond it, NOT REPRODUCED when the whole interval falls short
    of it, else INCONCLUSIVE.
    equivalence (TOST; give an interval at 1 - 2 alpha, 90 % for alpha 0.05): REPRODUCED when the interval lies
    within (-margin, margin), NOT REPRODUCED when it lies wholly outside, else INCONCLUSIVE."""
    if margin < 0:
        raise ValueError(f"the margin is a size, >= 0; got {margin}")
    if test == "equivalence":
        if -margin < estimate.low and estimate.high < margin:
            return "REPRODUCED"
        if estimate.low >= margin or estimate.high <= -margin:
            return "NOT REPRODUCED"
        return "INCONCLUSIVE"
    effect_low, effect_high = (-estimate.high, -estimate.low) if direction == "lower" else (estimate.low, estimate.high)
    if effect_low > margin:
        return "REPRODUCED"
    if effect_high < margin:
        return "NOT REPRODUCED"
    return "INCONCLUSIVE"
