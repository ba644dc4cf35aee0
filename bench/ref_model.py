"""The plain GPT of the reference loops (bench/ref_distill.py, bench/ref_quality.py): ref_gpt.py's blocks, the
forward returning the logits and the last block's q, k, v projections."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(s, d, h):
        super().__init__()
        s.h = h
        s.ln1, s.qkv, s.o = nn.LayerNorm(d), nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        s.ln2, s.fc, s.pr = nn.LayerNorm(d), nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(s, x):
        B, T, C = x.shape
        qkv = s.qkv(s.ln1(x))
        q, k, v = (t.view(B, T, s.h, C // s.h).transpose(1, 2) for t in qkv.split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + s.o(y)
        return x + s.pr(F.gelu(s.fc(s.ln2(x)))), qkv


class GPT(nn.Module):
    def __init__(s, vocab, ctx, layers, d, h):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        s.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        s.lnf, s.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        s.head.weight = s.wte.weight

    def forward(s, idx):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in s.blocks:
            x, qkv = b(x)
        return s.head(s.lnf(x)), qkv


def token_file(folder, split):
    return np.memmap(f"{folder}/{split}.bin", dtype=np.uint16, mode="r")


def get_batch(data, batch, ctx):
    """nanoGPT's get_batch: random windows of a memory-mapped uint16 token file."""
    ix = torch.randint(len(data) - ctx - 1, (batch,))
    x = torch.stack([torch.from_numpy(data[i : i + ctx].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + ctx].astype(np.int64)) for i in ix])
    return x, y
