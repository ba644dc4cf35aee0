"""Token windows over the flat token files that the tokenize stage writes."""

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


class SequentialWindows(Dataset):
    """Non-overlapping windows from the start, covering at most max_tokens targets."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_tokens: int | None = None):
        usable = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
        self.tokens, self.block_size = tokens, block_size
        self.n_items = max(usable // block_size, 1 if len(tokens) > 1 else 0)

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class ResumedSampler(Sampler):
    """Indices first..n-1 in order, with a length of n: a resumed Lightning epoch counts the batches it already
    ran toward the epoch's length, so the loader must report the whole epoch and yield only the rest."""

    def __init__(self, n: int, first: int = 0):
        self.n, self.first = n, first

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.first, self.n))


class TokenDataModule(L.LightningDataModule):
    """max_steps * batch_size random training windows, deterministic for a seed; its position is saved in
    checkpoints, so a resumed run continues with the next unseen batch."""

    def __init__(self, train: np.ndarray, block_size: int, batch_size: int, max_steps: int, seed: int):
        super().__init__()
        self.train, self.block_size, self.batch_size, self.max_steps, self.seed = (
            train,
            block_size,
            batch_size,
            max_steps,
            seed,
        )
        self.start_step = 0

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.train, self.block_size, self.max_steps * self.batch_size, self.seed)
        sampler = ResumedSampler(len(windows), first=self.start_step * self.batch_size)
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler)

    def state_dict(self) -> dict:
        return {"start_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.start_step = state["start_step"]


def sequential_loader(
    tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None
) -> DataLoader:
    return DataLoader(SequentialWindows(tokens, block_size, max_tokens), batch_size=batch_size, shuffle=False)
