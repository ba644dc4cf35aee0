"""Pruning: unstructured (magnitude, Wanda), semi-structured N:M, and structured (attention heads, MLP neurons,
whole layers), and recovery training with the pruned weights held at zero."""

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lm import calibrate, io, sparse
from lm.config import TrainConfig
from lm.gpt import GPT
from lm.lit import LitGPT
from lm.train import fit

log = logging.getLogger("lm.prune")


def prunable(model: GPT) -> list[nn.Linear]:
    """The blocks' Linear layers; embeddings and the tied head are kept dense."""
    return calibrate.linears(model.h)


def _zero_lowest_per_row(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    k = int(sparsity * weight.shape[1])
    if k:
        weight.scatter_(1, score.topk(k, dim=1, largest=False).indices, 0.0)


@torch.no_grad()
def magnitude_prune(model: GPT, sparsity: float, scope: str) -> None:
    """Zero the `sparsity` fraction of smallest |w|: per matrix (scope=layer) or under one global threshold."""
    layers = prunable(model)
    if scope == "global":
        scores = torch.cat([m.weight.abs().flatten() for m in layers])
        k = int(sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k else -1.0
        for m in layers:
            m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        return
    for m in layers:
        k = int(sparsity * m.weight.numel())
        if k:
            drop = m.weight.abs().flatten().topk(k, largest=False).indices
            m.weight.view(-1)[drop] = 0.0


def wanda_scores(layers: list[nn.Linear], hessians: list[torch.Tensor]) -> list[torch.Tensor]:
    """|W_ij| * ||X_j||: a weight matters as much as the inputs it multiplies (Sun et al. 2024)."""
    return [m.weight.abs() * h.diagonal().sqrt()[None, :] for m, h in zip(layers, hessians, strict=True)]


def sequential_wanda_scores(model: GPT, batches: list[torch.Tensor]) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """(Linear, Wanda score), block by block, each block's scores measured on inputs that went through the blocks
    before it: a caller that prunes each layer as it comes prunes in the order of Wanda's reference code, every
    block calibrated on what its pruned predecessors really pass on."""
    for block in model.h:
        layers = calibrate.linears(block)
        yield from zip(layers, wanda_scores(layers, calibrate.input_hessians(model, batches, layers)), strict=True)


@torch.no_grad()
def wanda_prune(model: GPT, sparsity: float, batches: list[torch.Tensor]) -> None:
    """Zero the `sparsity` fraction of lowest Wanda score in each output row."""
    for layer, score in sequential_wanda_scores(model, batches):
        _zero_lowest_per_row(layer.weight, score, sparsity)


@torch.no_grad()
def nm_prune(model: GPT, n: int, m: int, batches: list[torch.Tensor]) -> None:
    """Keep the n highest-Wanda-score weights of every m consecutive inputs of each row (2:4 for sparse tensor
    cores)."""
    for layer, score in sequential_wanda_scores(model, batches):
        out, cols = layer.weight.shape
        if cols % m:
            raise io.DataError(f"prune.m={m} does not divide the {cols} inputs of a {out}x{cols} layer")
        sparse.keep_n_of_m(layer.weight, score, n, m)


def _least_important(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    return importance.topk(int(fraction * importance.numel()), largest=False).indices


@torch.no_grad()
def prune_heads(model: GPT, fraction: float, batches: list[torch.Tensor]) -> None:
    """Per layer, remove the `fraction` of attention heads whose output projection carries the least:
    the Wanda score of c_proj summed over each head's input columns. A removed head's q, k, v rows and
    c_proj columns are zero."""
    projections = [b.attn.c_proj for b in model.h]
    scores = wanda_scores(projections, calibrate.input_hessians(model, batches, projections))
    for block, score in zip(model.h, scores, strict=True):
        attn, C = block.attn, block.attn.c_proj.in_features
        size = C // attn.n_head
        for head in _least_important(score.view(C, attn.n_head, size).sum(dim=(0, 2)), fraction).tolist():
            cols = slice(head * size, (head + 1) * size)
            attn.c_proj.weight[:, cols] = 0.0
            for part in range(3):  # q, k, v
                rows = slice(part * C + head * size, part * C + (head + 1) * size)
                attn.c_attn.weight[rows] = 0.0
                if attn.c_attn.bias is not None:
                    attn.c_attn.bias[rows] = 0.0


@torch.no_grad()
def prune_neurons(model: GPT, fraction: float, batches: list[torch.Tensor]) -> None:
    """Per layer, remove the `fraction` of MLP hidden neurons with the least Wanda score summed over their
    column of the down projection; a removed neuron's c_fc rows (both halves under SwiGLU) and c_proj column are
    zero."""
    downs = [b.mlp.c_proj for b in model.h]
    scores = wanda_scores(downs, calibrate.input_hessians(model, batches, downs))
    for block, score in zip(model.h, scores, strict=True):
        hidden = block.mlp.c_proj.in_features
        drop = _least_important(score.sum(dim=0), fraction)
        block.mlp.c_proj.weight[:, drop] = 0.0
        rows = torch.cat([drop + g * hidden for g in range(block.mlp.c_fc.out_features // hidden)])
        block.mlp.c_fc.weight[rows] = 0.0
        if block.mlp.c_fc.bias is not None:
            block.mlp.c_fc.bias[rows] = 0.0


@torch.no_grad()
def drop_layers(model: GPT, fraction: float, batches: list[torch.Tensor]) -> GPT:
    """A copy without the `fraction` of blocks that change their input least (smallest angular distance)."""
    if model.config.norm_placement in ("mix_ln", "deepnorm"):
        placement = model.config.norm_placement
        raise io.DataError(f"prune: removing layers needs blocks that do not depend on depth; {placement} ones do")
    distances = calibrate.angular_distances(model, batches)
    drop = set(_least_important(torch.tensor(distances), fraction).tolist())
    log.info("prune layers: angular distances %s; removing blocks %s", [round(d, 4) for d in distances], sorted(drop))
    pruned = GPT(dataclasses.replace(model.config, n_layer=model.config.n_layer - len(drop)))
    state = model.state_dict()
    kept = [i for i in range(model.config.n_layer) if i not in drop]
    renamed = {}
    for k, v in state.items():
        if k.startswith("h."):
            layer, rest = k[2:].split(".", 1)
            if int(layer) not in drop:
                renamed[f"h.{kept.index(int(layer))}.{rest}"] = v
        else:
            renamed[k] = v
    pruned.load_state_dict(renamed)
    return pruned.eval()


class HoldMasks(L.Callback):
    """Keep pruned weights at zero through recovery training: re-zero them after every optimizer step."""

    def __init__(self, model: GPT):
        self.masks = [(m.weight, m.weight != 0) for m in prunable(model)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for weight, mask in self.masks:
            weight.mul_(mask)


def recover(
    model: GPT, cfg: TrainConfig, tokens_dir: str | Path, seed: int, on_log: Callable[[dict, int], None] | None = None
) -> float:
    """Train with the zeros held; returns the val loss after. on_log: as lm.train.fit's (the training curve)."""
    L.seed_everything(seed, verbose=False)
    result = fit(LitGPT(model.train(), cfg), cfg, tokens_dir, seed, on_log, callbacks=[HoldMasks(model)])
    model.eval()
    return result["val_loss"]
