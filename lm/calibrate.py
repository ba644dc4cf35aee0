"""Activation statistics on calibration windows, for pruning (Wanda, structured) and quantization (GPTQ)."""

import math

import numpy as np
import torch
from torch import nn

from lm.gpt import GPT


def linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers inside module, in the order they run (of a GPT's blocks `model.h`, or of one block):
    what the calibration hooks watch and what pruning and quantization change."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def calibration_batches(tokens: np.ndarray, block_size: int, samples: int, batch_size: int = 16) -> list[torch.Tensor]:
    """`samples` windows spread evenly over the whole token stream, as input batches: the same for every run, and
    drawn from every part of the corpus (the stream's first windows are a few documents of one source)."""
    last = max(len(tokens) - block_size, 0)
    starts = np.unique(np.linspace(0, last, samples).astype(np.int64))
    windows = np.stack([tokens[s : s + block_size] for s in starts]).astype(np.int64)
    return list(torch.from_numpy(windows).split(batch_size))


@torch.no_grad()
def input_hessians(model: GPT, batches: list[torch.Tensor], modules: list[nn.Module]) -> list[torch.Tensor]:
    """X^T X of each module's inputs over every calibration token: GPTQ's Hessian, and its diagonal is Wanda's
    squared input norm per feature."""
    stats = [None] * len(modules)

    def hook(i):
        def accumulate(module, args, output):
            x = args[0].detach().float().flatten(0, -2)
            stats[i] = x.T @ x if stats[i] is None else stats[i] + x.T @ x

        return accumulate

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def angular_distances(model: GPT, batches: list[torch.Tensor]) -> list[float]:
    """Per block, the mean angle between its input and output token vectors, over pi (Gromov et al. 2024):
    near 0 means the block barely changes the residual stream."""
    totals, count = [0.0] * len(model.h), 0

    def hook(i):
        def measure(module, args, output):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1).clamp(-1, 1)
            totals[i] += (torch.arccos(cos) / math.pi).sum().item()

        return measure

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.h)]
    try:
        for x in batches:
            model(x)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    return [t / count for t in totals]
