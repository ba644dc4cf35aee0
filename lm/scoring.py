"""Next-token loss of a model over val windows, window by window: what training reports and evaluate compares.
Free of Lightning, so scoring a model does not import a training framework."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lm.gpt import GPT
from lm.tokens import domain_runs


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


def sequential_loader(
    tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None
) -> DataLoader:
    return DataLoader(SequentialWindows(tokens, block_size, max_tokens), batch_size=batch_size, shuffle=False)


@torch.no_grad()
def window_losses(model: GPT, loader: DataLoader) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each window in the loader, on the CPU: two models scored on the
    same windows can be compared window by window."""
    model.eval()
    device = next(model.parameters()).device
    # one tensor filled in place: a small tensor kept per batch splits the freed logits' memory for the next
    # batch, and the process's heap grows by hundreds of MB over a few models
    losses, done = torch.empty(len(loader.dataset), dtype=torch.float64), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        losses[done : done + len(y)] = model.token_losses(x, y).double().mean(dim=1)
        done += len(y)
    return losses


def window_domains(tokens_dir: str | Path, block_size: int, windows: int) -> list[str]:
    """The domain of each of the first `windows` SequentialWindows over the val split: its middle token's."""
    return domain_runs(tokens_dir, "val").at(np.arange(windows) * block_size + block_size // 2)


def domain_losses(losses: np.ndarray, domains: list[str]) -> dict[str, float]:
    """val_loss_<domain>: the mean loss of each domain's windows, when the windows span more than one domain."""
    names = sorted(set(domains))
    if len(names) < 2:
        return {}
    labels = np.asarray(domains)
    return {f"val_loss_{name}": float(np.asarray(losses)[labels == name].mean()) for name in names}
