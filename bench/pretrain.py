"""Training throughput of our pretrain path (Lightning, lm.train.fit) against bench/ref_gpt.py, same shape.

    python bench/pretrain.py [--layers 4 --dim 128 --heads 4 --ctx 128 --vocab 4096 --batch 32 --steps 30]

Both run in this process's machine in the same invocation; warm-up steps are excluded from both.
Ends with one JSON line: ours and the reference's tokens/s, ratio (ours / reference) and bar_met (ratio >= bar).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import io  # noqa: E402
from lm.config import TrainConfig  # noqa: E402
from lm.gpt import GPT, GPTConfig  # noqa: E402
from lm.lit import LitGPT  # noqa: E402
from lm.train import fit  # noqa: E402

WARMUP = 5
SHAPE = {"layers": 4, "dim": 128, "heads": 4, "ctx": 128, "vocab": 4096, "batch": 32, "steps": 30}


def ours(a) -> float:
    cfg = GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.ctx, vocab_size=a.vocab)
    steps = WARMUP + a.steps
    train = TrainConfig(
        max_steps=steps, batch_size=a.batch, lr=3e-4, min_lr=3e-5, warmup_steps=1, log_every=WARMUP, val_batches=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, a.vocab, 200_000, dtype=np.uint16).tofile(Path(tmp) / f"{split}.bin")
        io.write_json(Path(tmp) / "meta.json", {"dtype": "uint16", "vocab_size": a.vocab})
        rows = fit(LitGPT(GPT(cfg), train), train, tmp, seed=0)["history"]
    # rows carry cumulative tokens/s from the start of training: difference out the warm-up
    first, last = rows[0], rows[-1]
    tokens = lambda r: r["step"] * a.batch * a.ctx  # noqa: E731
    seconds = lambda r: tokens(r) / r["tokens_per_s"]  # noqa: E731
    return (tokens(last) - tokens(first)) / (seconds(last) - seconds(first))


def reference(a) -> float:
    shape = [f"--{k}={getattr(a, k)}" for k in SHAPE]
    cmd = [sys.executable, str(Path(__file__).with_name("ref_gpt.py")), *shape, "--compile=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--bar", type=float, default=0.9)
    a = p.parse_args()
    ref = reference(a)
    our = ours(a)
    figures = {"ours_tokens_per_s": round(our), "reference_tokens_per_s": round(ref), "ratio": round(our / ref, 3)}
    print(json.dumps({"bench": "pretrain", **figures, "bar": a.bar, "bar_met": our / ref >= a.bar, "shape": vars(a)}))


if __name__ == "__main__":
    main()
