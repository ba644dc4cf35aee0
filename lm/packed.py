"""The int4 storage format: weights as packed integer codes with an fp16 scale and an integer zero point per group
of `group_size` input columns, two 4-bit codes per byte, so the bytes on disk and in memory are what the bit
width says. The packed modules dequantize on the fly, except an int4 Linear applied to one row (decoding's head)
on the CPU: torch's int4 matmul reads the packed weight there. lm/quant.py computes the codes; lm/model_dir.py
loads them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padded: zeros leave a range that holds 0 unchanged."""
    out, n = w.shape
    groups = math.ceil(n / group_size)
    return F.pad(w, (0, groups * group_size - n)).view(out, groups, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n = codes.shape[1]
    g = grouped(codes.float(), group_size)
    return ((g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).flatten(1)[:, :n]


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


INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 matmul takes


class QuantizedLinear(QuantizedWeight):
    """On one row (greedy or sampled decoding's last position) an int4 weight is multiplied packed, by torch's CPU
    int4 matmul, a few times faster there than dequantizing it; from a few rows up dequantizing once and a
    float GEMM win by far (measured: README, Speed), so every other input takes that path."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__(linear.out_features, linear.in_features, bits, group_size)
        self.bias = linear.bias
        self.int4_kernel_weight = None

    def set(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> "QuantizedLinear":
        self.int4_kernel_weight = None  # made anew from these codes on first use
        return super().set(codes, scale, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dtype == torch.float32 and (kernel := self.int4_kernel()):
            packed_weight, group, scales_and_zeros = kernel
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(1, -1), packed_weight, group, scales_and_zeros)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def int4_kernel(self) -> tuple[torch.Tensor, int, torch.Tensor] | None:
        """The weight in the CPU int4 matmul's layout, made on first use: codes packed its way, and per kernel
        group (gcd of our group size and the width, so each lies within one of ours) a scale and an offset,
        w = (q - 8) * scale + offset, the same weights as ours, w = (q - zero) * scale. None where the kernel
        cannot hold them."""
        group = math.gcd(self.group_size, self.in_features)
        fits = group in INT4_KERNEL_GROUPS and self.out_features % 16 == 0  # the kernel's tiles
        if self.bits != 4 or self.codes.device.type != "cpu" or not fits:
            return None
        if self.int4_kernel_weight is None:
            codes = unpack(self.codes, 4, self.in_features).to(torch.int32)
            ours = torch.arange(self.in_features // group) * group // self.group_size  # our group of each
            scale, zero = self.scale.float()[:, ours], self.zero.float()[:, ours]
            scales_and_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.int4_kernel_weight = (packed_weight, group, scales_and_zeros)
        return self.int4_kernel_weight


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
