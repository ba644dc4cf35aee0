"""Random windows over the token files (lm/tokens.py) for training, resumable by step (sequential ones for
scoring: lm/scoring.py)."""

from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm.config import ConfigError, TrainConfig
from lm.tokens import DomainRuns, domain_runs


class DomainMixture:
    """Window starts drawn domain by domain: a domain of weight w holding a share s of the tokens is drawn with
    probability proportional to w * s, the start uniform over its tokens."""

    def __init__(self, runs: DomainRuns, n_tokens: int, weights: dict[str, float], block_size: int):
        starts_end = n_tokens - block_size - 1  # a window starting before it fits
        unknown = sorted(set(weights) - set(runs.domains))
        if unknown:
            raise ConfigError(
                f"final_mixture: no train tokens of domain {unknown}; the domains: {sorted(set(runs.domains))}"
            )
        spans = {d: runs.spans(d, starts_end) for d in dict.fromkeys(runs.domains)}
        spans = {d: np.array(s, dtype=np.int64) for d, s in spans.items() if s}
        # per domain: its spans' starts, and the cumulative sizes that map an offset within the domain to a span
        self.starts = [s[:, 0] for s in spans.values()]
        self.ends = [np.cumsum(s[:, 1] - s[:, 0]) for s in spans.values()]
        mass = np.array([ends[-1] * weights.get(d, 1.0) for d, ends in zip(spans, self.ends, strict=True)])
        self.probabilities = mass / mass.sum()

    def start(self, rng: np.random.Generator) -> int:
        d = rng.choice(len(self.probabilities), p=self.probabilities)
        offset = int(rng.integers(0, self.ends[d][-1]))
        span = int(np.searchsorted(self.ends[d], offset, side="right"))
        return int(self.starts[d][span]) + offset - (int(self.ends[d][span - 1]) if span else 0)


class RandomWindows(Dataset):
    """Item i is a random (input, target) window whose offset depends only on (seed, i): resumable by index. From
    item mixture_from on, starts come from `mixture` (domain upsampling at the end of training)."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        n_items: int,
        seed: int,
        mixture: DomainMixture | None = None,
        mixture_from: int = 0,
    ):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of block_size {block_size}")
        self.tokens, self.block_size, self.n_items, self.seed = tokens, block_size, n_items, seed
        self.mixture, self.mixture_from = mixture, mixture_from

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        if self.mixture is not None and i >= self.mixture_from:
            start = self.mixture.start(rng)
        else:
            start = int(rng.integers(0, len(self.tokens) - self.block_size - 1))
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class TopKLogits(NamedTuple):
    """A teacher's k largest logits at every position of every training window: (windows, block_size, k) each."""

    values: np.ndarray
    indices: np.ndarray
    """Their vocabulary indices."""


class WithTeacherLogits(Dataset):
    """Windows with the teacher's cached top-k logits (values, vocabulary indices) for each of their positions."""

    def __init__(self, windows: Dataset, teacher_logits: TopKLogits):
        if len(teacher_logits.values) != len(windows):
            cached = len(teacher_logits.values)
            raise ValueError(f"the teacher cache holds {cached} windows, training needs {len(windows)}")
        self.windows, (self.values, self.indices) = windows, teacher_logits

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        x, y = self.windows[i]
        values = torch.from_numpy(self.values[i].astype(np.float32))
        return x, y, values, torch.from_numpy(self.indices[i].astype(np.int64))


class StepSampler(Sampler):
    """Window numbers for one rank: optimizer step s gives rank r the windows (s * world + r) * n ... + n - 1, with
    n = per_step (micro-batch size x accumulation), so a step's global batch is the same windows whatever the
    number of ranks or micro-batches, and a run resumed at start_step continues where it stopped. The length is
    the whole epoch's: a resumed Lightning epoch counts the batches it already ran."""

    def __init__(self, per_step: int, max_steps: int, world_size: int = 1, rank: int = 0, start_step: int = 0):
        self.per_step, self.max_steps, self.world_size, self.rank = per_step, max_steps, world_size, rank
        self.start_step = start_step

    def __len__(self) -> int:
        return self.max_steps * self.per_step

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            first = (step * self.world_size + self.rank) * self.per_step
            yield from range(first, first + self.per_step)


def train_tokens(tokens: np.ndarray, limit: int, block_size: int) -> np.ndarray:
    """The train tokens a training block draws its windows from: the first `limit` (0: all)."""
    if not limit:
        return tokens
    if not block_size < limit <= len(tokens):
        raise ConfigError(
            f"train_tokens: {limit} must be in ({block_size}, {len(tokens)}]: more than one window, at most the"
            " train split"
        )
    return tokens[:limit]


def final_mixture(cfg: TrainConfig, tokens_dir, n_tokens: int, block_size: int) -> tuple[DomainMixture | None, int]:
    """The end-of-training mixture of cfg over the first n_tokens train tokens, and the steps it applies to."""
    if not cfg.final_mixture:
        return None, 0
    runs = domain_runs(tokens_dir, "train")
    return DomainMixture(runs, n_tokens, cfg.final_mixture, block_size), round(cfg.final_fraction * cfg.max_steps)


def training_windows(
    train: np.ndarray,
    block_size: int,
    per_step: int,
    max_steps: int,
    world_size: int,
    seed: int,
    mixture: DomainMixture | None = None,
    final_steps: int = 0,
) -> RandomWindows:
    """Every window a run of max_steps steps of per_step windows on each of world_size ranks can draw; those of
    the last final_steps steps from `mixture`."""
    per_global_step = world_size * per_step
    first_final = (max_steps - final_steps) * per_global_step
    return RandomWindows(train, block_size, max_steps * per_global_step, seed, mixture, first_final)


class TokenDataModule(L.LightningDataModule):
    """max_steps global batches of random training windows (batch_size x grad_accum per rank), deterministic for a
    seed; its position is saved in checkpoints, so a resumed run continues with the next unseen batch.
    teacher_logits: a teacher's top-k logits with a row per training window, served with each window.
    mixture: final_mixture's (the last steps' domain mixture, their number)."""

    def __init__(
        self,
        train: np.ndarray,
        block_size: int,
        batch_size: int,
        max_steps: int,
        seed: int,
        grad_accum: int = 1,
        teacher_logits: TopKLogits | None = None,
        mixture: tuple[DomainMixture | None, int] = (None, 0),
    ):
        super().__init__()
        self.grad_accum, self.teacher_logits, self.mixture = grad_accum, teacher_logits, mixture
        self.train, self.block_size, self.batch_size, self.max_steps, self.seed = (
            train,
            block_size,
            batch_size,
            max_steps,
            seed,
        )
        self.start_step = 0

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_step = self.batch_size * self.grad_accum
        windows = training_windows(
            self.train, self.block_size, per_step, self.max_steps, world, self.seed, *self.mixture
        )
        if self.teacher_logits is not None:
            windows = WithTeacherLogits(windows, self.teacher_logits)
        sampler = StepSampler(per_step, self.max_steps, world, rank, self.start_step)
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler)

    def state_dict(self) -> dict:
        return {"start_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.start_step = state["start_step"]
