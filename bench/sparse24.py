"""2:4 semi-structured sparse block weights against the same weights dense: forward latency on a CUDA GPU, bf16.

    python bench/sparse24.py [--model models/prune/nm] [--layers 12 --dim 768 --heads 12 --ctx 1024 --batch 8]

Without --model it builds a GPT of the given shape (default: GPT-2 124M's) and keeps the 2 largest of every 4
block weights (the kernels' speed does not depend on which are kept). Ours: that model with its 2:4 block weights
as PyTorch semi-structured tensors (lm.sparse.to_semi_structured); reference: the same model dense. Both forward
the same batch x ctx tokens, and their logits must agree. Ends with one JSON line: ms per forward of each, ratio
(dense ms / sparse ms: the speed-up) and bar_met (ratio >= bar). Without CUDA it says so in that line.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import model_dir  # noqa: E402
from lm.calibrate import linears  # noqa: E402
from lm.gpt import GPT, GPTConfig  # noqa: E402
from lm.quant import logit_error  # noqa: E402
from lm.sparse import keep_n_of_m, to_semi_structured  # noqa: E402


def ms_per_forward(model: GPT, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):  # warm-up: kernel selection, allocator
        model(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="a 2:4-pruned model directory (prune.methods [nm]); default: a built one")
    for name, default in {"layers": 12, "dim": 768, "heads": 12, "ctx": 1024, "vocab": 50304, "batch": 8}.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--bar", type=float, default=1.0)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "2:4 sparse kernels need a CUDA GPU; none here", "bar_met": False}))
        return
    if a.model:
        dense = model_dir.load(a.model)
    else:
        torch.manual_seed(0)
        cfg = GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.ctx, vocab_size=a.vocab)
        dense = GPT(cfg).eval()
        with torch.no_grad():
            for layer in linears(dense.h):
                keep_n_of_m(layer.weight, layer.weight.abs(), 2, 4)
    dense = dense.to("cuda", torch.bfloat16).eval()
    sparse = copy.deepcopy(dense)
    converted = to_semi_structured(sparse)
    ctx = min(a.ctx, dense.config.block_size)
    x = torch.randint(0, dense.config.vocab_size, (a.batch, ctx), device="cuda")
    with torch.inference_mode():
        error = logit_error(sparse, dense, [x])
        if error > 0.02:
            raise SystemExit(f"sparse and dense logits differ by {error:.3f} (relative): the 2:4 kernels are wrong")
        dense_ms, sparse_ms = ms_per_forward(dense, x, a.repeats), ms_per_forward(sparse, x, a.repeats)
    ratio = dense_ms / sparse_ms
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": {"layers": dense.config.n_layer, "dim": dense.config.n_embd, "batch": a.batch, "ctx": ctx},
        "sparse_layers": converted,
        "logit_relative_error": round(error, 5),
        "dense_ms": round(dense_ms, 3),
        "sparse_ms": round(sparse_ms, 3),
        "ratio": round(ratio, 3),
        "bar_met": ratio >= a.bar,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
