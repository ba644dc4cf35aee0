"""Reference quality per step: ref_gpt.py's plain loop with nanoGPT's train.py defaults for the optimizer and
schedule (AdamW lr 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1.0, linear warmup over 2,000 of
600,000 iterations, cosine decay to min_lr 6e-5 at the last one), the warmup and decay scaled to --steps; then
the mean next-token loss over the first --val-tokens of val.bin in consecutive windows, as the pretrain stage
reports it.

    python bench/ref_quality.py --data data/tokens --steps 300 [--layers 4 --dim 128 --heads 4 --ctx 128 ...]

Prints one JSON line: val_loss, tokens/s of the training loop, steps.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from ref_model import GPT, get_batch, token_file

p = argparse.ArgumentParser()
p.add_argument("--data", required=True, help="a tokens folder (train.bin, val.bin, uint16)")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--ctx", type=int, default=128)
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--val-tokens", type=int, default=81920)
p.add_argument("--seed", type=int, default=1337)
a = p.parse_args()
torch.manual_seed(a.seed)

LR, MIN_LR, WARMUP_FRACTION = 6e-4, 6e-5, 2000 / 600000
warmup = max(1, round(WARMUP_FRACTION * a.steps))


def lr_at(it):  # nanoGPT's get_lr, lr_decay_iters = max_iters
    if it < warmup:
        return LR * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / max(a.steps - warmup, 1)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


model = GPT(a.vocab, a.ctx, a.layers, a.dim, a.heads)
for name, w in model.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections scaled by depth
    if w.dim() >= 2:
        std = 0.02 / math.sqrt(2 * a.layers) if name.endswith(("o.weight", "pr.weight")) else 0.02
        torch.nn.init.normal_(w, 0.0, std)
decay = [w for w in model.parameters() if w.dim() >= 2]
no_decay = [w for w in model.parameters() if w.dim() < 2]
groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
train, val = token_file(a.data, "train"), token_file(a.data, "val")

t = time.perf_counter()
for it in range(a.steps):
    for group in opt.param_groups:
        group["lr"] = lr_at(it)
    x, y = get_batch(train, a.batch, a.ctx)
    logits, _ = model(x)
    F.cross_entropy(logits.view(-1, a.vocab), y.view(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
seconds = time.perf_counter() - t

model.eval()
windows = max(min(len(val) - 1, a.val_tokens) // a.ctx, 1)
losses = []
with torch.no_grad():
    for start in range(0, windows, a.batch):
        chunks = [
            torch.from_numpy(val[i * a.ctx : (i + 1) * a.ctx + 1].astype(np.int64))
            for i in range(start, min(start + a.batch, windows))
        ]
        xy = torch.stack(chunks)
        logits, _ = model(xy[:, :-1])
        losses.append(
            F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten(), reduction="none")
            .view(len(chunks), -1)
            .double()
            .mean(1)
        )
val_loss = torch.cat(losses).mean().item()
print(
    json.dumps(
        {
            "val_loss": round(val_loss, 4),
            "tokens_per_s": round(a.steps * a.batch * a.ctx / seconds),
            "steps": a.steps,
            "train_seconds": round(seconds, 1),
        }
    )
)
