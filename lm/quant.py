"""Group-wise weight-only quantization that runs on CPU: round-to-nearest or GPTQ, codes packed into bytes.

Written here because torchao 0.18's int4 layouts need GPU kernels (tinygemm, mslk) and its GPTQ is CUDA-only.
A weight (out, in) is cut into groups of `group_size` input columns; each (row, group) gets an fp16 scale and an
integer zero point (asymmetric min-max, with 0 kept inside the range so pruned weights stay exactly zero).
Two 4-bit codes share a byte, so the bytes on disk and in memory are what the bit width says.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padded: zeros leave a range that holds 0 unchanged."""
    out, n = w.shape
    groups = math.ceil(n / group_size)
    return F.pad(w, (0, groups * group_size - n)).view(out, groups, group_size)


def qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of w (..., k): min-max over the row and 0; the scale rounded to fp16 as stored."""
    qmax = 2**bits - 1
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-6).half().float()
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes (out, in), scale and zero (out, groups)."""
    g = _grouped(w.float(), group_size)
    scale, zero = qparams(g, bits)
    codes = to_codes(g, scale, zero, bits).flatten(1)[:, : w.shape[1]]
    return codes, scale.squeeze(-1), zero.squeeze(-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n = codes.shape[1]
    g = _grouped(codes.float(), group_size)
    return ((g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).flatten(1)[:, :n]


@torch.no_grad()
def gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2023): quantize one input column at a time and spread its error over the columns
    not yet quantized, weighted by the inverse Hessian of the layer's inputs (hessian = X^T X over calibration
    tokens). In input order, a group's scale is chosen when its first column comes up, from the weights as
    updated so far. act_order takes the columns by decreasing input energy (the Hessian's diagonal) instead, so
    the columns that matter most are quantized while the most columns remain to absorb their error; a group's
    columns then no longer come up together, so its scale is set from the original weights (AutoGPTQ's
    desc_act with static groups). Weights that are exactly zero (pruned) stay zero. Same outputs as rtn();
    lower output error on those inputs."""
    W = w.float().clone()
    out, n = W.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = math.ceil(n / group_size)
    scales, zeros = torch.zeros(out, groups), torch.zeros(out, groups)
    if act_order:
        scale, zero = qparams(_grouped(W, group_size), bits)
        scales, zeros = scale.squeeze(-1), zero.squeeze(-1)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, order], H[order][:, order]
    keep = W != 0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for j in range(n):
        group = order[j].item() // group_size
        if not act_order and j % group_size == 0:
            scale, zero = qparams(W[:, j : j + group_size], bits)
            scales[:, group], zeros[:, group] = scale[:, 0], zero[:, 0]
        scale, zero = scales[:, group : group + 1], zeros[:, group : group + 1]
        q = to_codes(W[:, j : j + 1], scale, zero, bits)
        codes[:, j] = q[:, 0]
        err = (W[:, j] - ((q - zero) * scale)[:, 0]) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        W[:, j + 1 :] *= keep[:, j + 1 :]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted, scales, zeros


@torch.no_grad()
def logit_error(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    """Relative error of a compressed model's logits: ||model - reference|| / ||reference|| over the batches."""
    err = norm = 0.0
    for x in batches:
        expected = reference(x).float()
        err += (model(x).float() - expected).square().sum().item()
        norm += expected.square().sum().item()
    return (err / norm) ** 0.5


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes holding 8 // bits codes each, along the input dimension."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    codes = F.pad(codes, (0, -codes.shape[1] % per_byte)).view(codes.shape[0], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(1)[:, :n]


class QuantizedWeight(nn.Module):
    """A packed (out, in) weight; `.weight` is its fp32 dequantization."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int):
        super().__init__()
        self.out_features, self.in_features, self.bits, self.group_size = out_features, in_features, bits, group_size
        groups = math.ceil(in_features / group_size)
        self.register_buffer("codes", torch.zeros(out_features, math.ceil(in_features * bits / 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))

    def set(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> "QuantizedWeight":
        self.codes.copy_(pack(codes, self.bits))
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        return self

    def share(self, other: "QuantizedWeight") -> None:
        """Use other's buffers (a head tied to the embedding)."""
        self.codes, self.scale, self.zero = other.codes, other.scale, other.zero

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(unpack(self.codes, self.bits, self.in_features), self.scale, self.zero, self.group_size)

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, bits={self.bits}, group_size={self.group_size}"


class QuantizedLinear(QuantizedWeight):
    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__(linear.out_features, linear.in_features, bits, group_size)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class QuantizedEmbedding(QuantizedWeight):
    def __init__(self, embedding: nn.Embedding, bits: int, group_size: int):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, bits, group_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.flatten().unique(return_inverse=True)  # dequantize only the rows looked up
        codes = unpack(self.codes[rows[0]], self.bits, self.in_features)
        table = dequantize(codes, self.scale[rows[0]], self.zero[rows[0]], self.group_size)
        return table[rows[1]].view(*idx.shape, self.in_features)


def convert(model: nn.Module, bits: int, group_size: int, quantized: dict | None = None) -> None:
    """Swap a GPT's block Linears, head and embedding for packed modules, filled from quantized[original module]
    = (codes, scale, zero), or left empty to load a state dict into. A tied head shares the embedding's bytes."""

    def swap(parent: nn.Module, name: str, cls: type) -> QuantizedWeight:
        original = getattr(parent, name)
        new = cls(original, bits, group_size)
        if quantized is not None:
            new.set(*quantized[original])
        setattr(parent, name, new)
        return new

    for parent in list(model.h.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                swap(parent, name, QuantizedLinear)
    head = swap(model, "lm_head", QuantizedLinear)
    if model.config.tie_embeddings:
        model.wte = QuantizedEmbedding(model.wte, bits, group_size)
        model.wte.share(head)
    else:
        swap(model, "wte", QuantizedEmbedding)
