"""Scaling laws: L(N, D) = E + A·N^-α + B·D^-β, fitted as Hoffmann et al. (2022, Chinchilla, approach 3) fit
theirs: a Huber loss on log L, minimized by L-BFGS from a grid of starting points, the best fit kept. N is
parameters, D training tokens; each point is one model at one checkpoint (its val loss there), so a ladder of
sizes with intermediate validations gives many points per run ("A Hitchhiker's Guide to Scaling Law
Estimation": fits on intermediate checkpoints predict better than fits on final losses only)."""

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize
from scipy.special import huber, logsumexp


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, N, D):
        return (
            self.E
            + self.A * np.asarray(N, dtype=float) ** -self.alpha
            + self.B * np.asarray(D, dtype=float) ** -self.beta
        )

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N*, D*) minimizing the loss at C = 6·N·D training FLOPs."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a = self.beta / (self.alpha + self.beta)
        n = g * (flops / 6) ** a
        return n, flops / (6 * n)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """The Huber loss of log L's residuals and its gradient in (log A, log B, log E, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = logsumexp(terms, axis=0)
    residual = predicted - log_l
    weights = np.exp(terms - predicted)  # d predicted / d term
    slope = np.clip(residual, -delta, delta)  # the Huber loss's derivative
    grad = np.array(
        [
            (slope * weights[0]).sum(),
            (slope * weights[1]).sum(),
            (slope * weights[2]).sum(),
            -(slope * weights[0] * log_n).sum(),
            -(slope * weights[1] * log_d).sum(),
        ]
    )
    return huber(delta, residual).sum(), grad


STARTS = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
"""The grid of starting points (log A, log B, log E, α, β): Chinchilla's."""


def fit(N, D, L, delta: float = 1e-3, starts: int = 16) -> Law:
    """The law through points (N[i], D[i], L[i]) with the least Huber loss on log L: L-BFGS from the `starts`
    points of the STARTS grid where the loss is lowest, the best end kept."""
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (N, D, L))
    if len(log_l) < 5:
        raise ValueError(f"{len(log_l)} points cannot fix a law of 5 parameters")
    args = (log_n, log_d, log_l, delta)
    grid = np.array(list(itertools.product(*STARTS.values())))
    ranked = grid[np.argsort([_objective(start, *args)[0] for start in grid])]
    fits = [optimize.minimize(_objective, start, args=args, method="L-BFGS-B", jac=True) for start in ranked[:starts]]
    best = min(fits, key=lambda result: result.fun)
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))


def leave_one_size_out(N, D, L) -> dict[str, tuple[float, float]]:
    """The range of each fitted constant over the fits that leave one model size out: how much the law rests on
    any one size."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    laws = [fit(N[N != size], D[N != size], L[N != size]) for size in np.unique(N)]
    return {
        key: (min(getattr(w, key) for w in laws), max(getattr(w, key) for w in laws)) for key in ("E", "alpha", "beta")
    }
