"""Weight-only quantization that runs on CPU: torchao's int8, and 4-bit group-wise round-to-nearest or GPTQ into
the packed format of lm/packed.py.

The int4 path is written here because torchao 0.18's int4 layouts need GPU kernels (tinygemm, mslk) and its GPTQ
is CUDA-only. A weight (out, in) is cut into groups of `group_size` input columns; each (row, group) gets an fp16
scale and an integer zero point (asymmetric min-max, with 0 kept inside the range so pruned weights stay exactly
zero).
"""

import math

import torch
from torch import nn

from lm import calibrate, model_dir
from lm.gpt import GPT
from lm.packed import convert, dequantize, grouped


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
    g = grouped(w.float(), group_size)
    scale, zero = qparams(g, bits)
    codes = to_codes(g, scale, zero, bits).flatten(1)[:, : w.shape[1]]
    return codes, scale.squeeze(-1), zero.squeeze(-1)


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
    desc_act with static groups). Weights that are exactly zero (pruned) stay zero: they take the updates of the
    columns before them like any weight and, when their column comes up, the code of zero, their error passed on
    like a rounding error (SparseGPT's sweep with the mask fixed), rather than dropping the updates that fall on
    them. Same outputs as rtn(); lower output error on those inputs."""
    W = w.float().clone()
    out, n = W.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = math.ceil(n / group_size)
    scales, zeros = torch.zeros(out, groups), torch.zeros(out, groups)
    if act_order:
        scale, zero = qparams(grouped(W, group_size), bits)
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
            scale, zero = qparams(W[:, j : j + group_size] * keep[:, j : j + group_size], bits)  # pruned: 0
            scales[:, group], zeros[:, group] = scale[:, 0], zero[:, 0]
        scale, zero = scales[:, group : group + 1], zeros[:, group : group + 1]
        q = torch.where(keep[:, j : j + 1], to_codes(W[:, j : j + 1], scale, zero, bits), zero)
        codes[:, j] = q[:, 0]
        err = (W[:, j] - ((q - zero) * scale)[:, 0]) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
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


def quantize_int8(model: GPT) -> GPT:
    """torchao int8 weight-only: the blocks' Linears and an untied head get a scale per output channel, the
    embedding a scale per row; a tied head then reads the same int8 table."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    quantize_(model.h, Int8WeightOnlyConfig())
    per_row = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    quantize_(model.wte, per_row, filter_fn=lambda module, name: isinstance(module, nn.Embedding))
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    else:
        quantize_(model.lm_head, Int8WeightOnlyConfig())
    return model


def linear_groups(model: GPT) -> list[list[nn.Linear]]:
    """The Linears in the order GPTQ takes them, each group's Hessians measured on inputs that went through the
    groups quantized before it. A head tied to the embedding comes first, on the unquantized model's head inputs:
    as the embedding it is the first weight the tokens meet, so every block then calibrates on the embedding it
    will really read. An untied head comes last, after the blocks that compute its inputs."""
    blocks = [calibrate.linears(block) for block in model.h]
    return [[model.lm_head], *blocks] if model.config.tie_embeddings else [*blocks, [model.lm_head]]


@torch.no_grad()
def quantize_int4(
    model: GPT, batches: list[torch.Tensor] | None, group_size: int, damp: float = 0.01, act_order: bool = True
) -> GPT:
    """4-bit group-wise, group by group in linear_groups' order (GPTQ's sequential order): the fp32 weights are
    overwritten with their dequantized values as they go, then swapped for packed modules. An untied embedding
    is round-to-nearest."""
    quantized = {}
    for group in linear_groups(model):
        hessians = calibrate.input_hessians(model, batches, group) if batches else [None] * len(group)
        for linear, hessian in zip(group, hessians, strict=True):
            if batches:
                q = gptq(linear.weight, hessian, 4, group_size, damp, act_order)
            else:
                q = rtn(linear.weight, 4, group_size)
            linear.weight.copy_(dequantize(*q, group_size))
            quantized[linear] = q
    if not model.config.tie_embeddings:
        quantized[model.wte] = rtn(model.wte.weight, 4, group_size)
    convert(model, 4, group_size, quantized)
    return model


def weight_bytes(model: GPT) -> int:
    """Bytes of the weights held in memory (shared tensors once; torchao tensors by their inner tensors)."""
    state = model_dir.untied_state_dict(model)
    total = 0
    for t in state.values():
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        total += sum(x.numel() * x.element_size() for x in inner)
    return total
