"""Reference distillation throughput: a plain PyTorch loop (no framework), written as ref_gpt.py is: a frozen
teacher's forward, a student trained on alpha * KL(teacher || student) + (1 - alpha) * cross-entropy, plus
MiniLM-v2 attention relations (q-q, k-k, v-v) of both last blocks, AdamW; nanoGPT's batches from train.bin.

    python bench/ref_distill.py --data data/tokens [--steps 300 --layers 2 --dim 96 --t-layers 4 --t-dim 128 ...]

Prints one JSON line: tokens/s over the timed steps (after 5 untimed ones).
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from ref_model import GPT, get_batch, token_file

p = argparse.ArgumentParser()
p.add_argument("--data", required=True, help="a tokens folder (train.bin, uint16)")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--dim", type=int, default=96)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--t-layers", type=int, default=4)
p.add_argument("--t-dim", type=int, default=128)
p.add_argument("--t-heads", type=int, default=4)
p.add_argument("--ctx", type=int, default=128)
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--alpha", type=float, default=0.5)
p.add_argument("--attention-weight", type=float, default=1.0)
a = p.parse_args()


def relations(qkv, heads):
    B, T, three_c = qkv.shape
    d = three_c // 3 // heads
    out = []
    for t in qkv.split(three_c // 3, dim=-1):
        t = t.view(B, T, heads, d).transpose(1, 2)
        scores = (t @ t.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
        out.append(F.log_softmax(scores, dim=-1))
    return out


student = GPT(a.vocab, a.ctx, a.layers, a.dim, a.heads)
teacher = GPT(a.vocab, a.ctx, a.t_layers, a.t_dim, a.t_heads).eval().requires_grad_(False)
opt = torch.optim.AdamW(student.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
heads = math.gcd(a.heads, a.t_heads)
future = torch.ones(a.ctx, a.ctx, dtype=torch.bool).triu(1)
data = token_file(a.data, "train")


def one():
    x, y = get_batch(data, a.batch, a.ctx)
    with torch.no_grad():
        t_logits, t_qkv = teacher(x)
    s_logits, s_qkv = student(x)
    s_logp, t_logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / (a.batch * a.ctx)
    ce = F.nll_loss(s_logp.view(-1, a.vocab), y.view(-1))
    rel = sum(
        F.kl_div(s.masked_fill(future, 0.0), t.masked_fill(future, 0.0), log_target=True, reduction="sum")
        for s, t in zip(relations(s_qkv, heads), relations(t_qkv, heads), strict=True)
    ) / (3 * a.batch * heads * a.ctx)
    loss = a.alpha * kl + (1 - a.alpha) * ce + a.attention_weight * rel
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(5):
    one()
t = time.perf_counter()
for _ in range(a.steps):
    one()
dt = (time.perf_counter() - t) / a.steps
print(json.dumps({"tokens_per_s": round(a.batch * a.ctx / dt), "step_ms": round(dt * 1e3, 1), "steps": a.steps}))
