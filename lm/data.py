"""Token windows over the flat token files that the tokenize stage writes."""

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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


class TokenDataModule(L.LightningDataModule):
    """max_steps * batch_size random training windows, deterministic for a seed."""

    def __init__(self, train: np.ndarray, block_size: int, batch_size: int, max_steps: int, seed: int):
        super().__init__()
        self.train_set = RandomWindows(train, block_size, max_steps * batch_size, seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


def sequential_loader(
    tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None
) -> DataLoader:
    return DataLoader(SequentialWindows(tokens, block_size, max_tokens), batch_size=batch_size, shuffle=False)
