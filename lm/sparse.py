"""N:M semi-structured sparsity: checking the pattern, and running 2:4 weights on a GPU's sparse tensor cores.

PyTorch's semi-structured tensors (cuSPARSELt, else CUTLASS) store a 2:4 matrix as its kept half plus 2-bit
indices and multiply it on Ampere-or-newer GPUs in fp16/bf16. There is no CPU kernel: on a CPU the zeros only
save what compression of the file saves.
"""

import torch
from torch import nn

from lm.calibrate import linears


def is_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every m consecutive inputs of each row."""
    out, cols = weight.shape
    return cols % m == 0 and bool(((weight.view(out, cols // m, m) != 0).sum(-1) <= n).all())


def keep_n_of_m(weight: torch.Tensor, score: torch.Tensor, n: int, m: int) -> None:
    """Zero, in place, all but the n highest-scoring of every m consecutive inputs of each row."""
    out, cols = weight.shape
    drop = score.view(out, cols // m, m).topk(m - n, dim=-1, largest=False).indices
    weight.view(out, cols // m, m).scatter_(-1, drop, 0.0)


def to_semi_structured(model: nn.Module) -> int:
    """Swap every 2:4 block Linear's weight for a semi-structured sparse tensor, in place; returns how many.
    The model must be on a CUDA device in fp16 or bf16 (what the sparse kernels take)."""
    from torch.sparse import to_sparse_semi_structured

    layers = [m for m in linears(model.h) if is_n_m(m.weight, 2, 4)]
    if not layers:
        raise ValueError("no block Linear has a 2:4 weight: prune with prune.methods [nm] (n 2, m 4) first")
    weight = layers[0].weight
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 sparse kernels need a CUDA fp16/bf16 model; this one is {weight.device} {weight.dtype}")
    for layer in layers:
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    return len(layers)
