"""Random windows over the token files (lm/tokens.py) for training, resumable by step (sequential ones for
scoring: lm/scoring.py)."""

from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm.config import ConfigError


class RandomWindows(Dataset):
    """Item i is a random (input, target) window whose offset depends only on (seed, i): resumable by index."""

    def __init__(self, tokens: np.ndarray, block_size: int, n_items: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of block_size {block_size}")
        self.tokens, self.block_size, self.n_items, self.seed = tokens, block_size, n_items, seed

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(np.random.default_rng([self.seed, i]).integers(0, len(self.tokens) - self.block_size - 1))
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


def training_windows(
    train: np.ndarray, block_size: int, per_step: int, max_steps: int, world_size: int, seed: int
) -> RandomWindows:
    """Every window a run of max_steps steps of per_step windows on each of world_size ranks can draw."""
    return RandomWindows(train, block_size, max_steps * world_size * per_step, seed)


class TokenDataModule(L.LightningDataModule):
    """max_steps global batches of random training windows (batch_size x grad_accum per rank), deterministic for a
    seed; its position is saved in checkpoints, so a resumed run continues with the next unseen batch.
    teacher_logits: a teacher's top-k logits with a row per training window, served with each window."""

    def __init__(
        self,
        train: np.ndarray,
        block_size: int,
        batch_size: int,
        max_steps: int,
        seed: int,
        grad_accum: int = 1,
        teacher_logits: TopKLogits | None = None,
    ):
        super().__init__()
        self.grad_accum, self.teacher_logits = grad_accum, teacher_logits
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
        windows = training_windows(self.train, self.block_size, per_step, self.max_steps, world, self.seed)
        if self.teacher_logits is not None:
            windows = WithTeacherLogits(windows, self.teacher_logits)
        sampler = StepSampler(per_step, self.max_steps, world, rank, self.start_step)
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler)

    def state_dict(self) -> dict:
        return {"start_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.start_step = state["start_step"]
