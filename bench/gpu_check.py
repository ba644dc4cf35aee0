"""The GPU paths, checked on a machine with a CUDA GPU (CPU tests cannot reach them): bf16-mixed by default,
fused AdamW, MFU against the GPU's spec peak, torch.compile, FSDP with a checkpoint that resumes; and our
training loop's tokens/s against bench/ref_gpt.py's plain loop at the same shape.

    python bench/gpu_check.py [--layers 12 --dim 768 --heads 12 --ctx 1024 --vocab 50304 --batch 16 --steps 40]

One JSON line per check, then a summary line: ratio = our in-loop tokens/s / the reference's (bf16, compiled
both), bar_met = every check passed and ratio >= bar.
"""

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import checkpoints, io  # noqa: E402
from lm.config import GPTConfig, TrainConfig  # noqa: E402
from lm.flops import device_peak_flops  # noqa: E402
from lm.gpt import GPT  # noqa: E402
from lm.lit import LitGPT  # noqa: E402
from lm.tokens import save_split  # noqa: E402
from lm.train import fit, resolve_precision  # noqa: E402

SHAPE = {"layers": 12, "dim": 768, "heads": 12, "ctx": 1024, "vocab": 50304, "batch": 16, "steps": 40}
results = []


def check(name: str, passed: bool, **figures) -> None:
    results.append(passed)
    print(json.dumps({"check": name, "passed": bool(passed), **figures}), flush=True)


def tokens_dir(folder: Path, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    splits = {
        split: {"shards": save_split(folder, split, [rng.integers(0, vocab, 2_000_000, dtype=np.uint16)])}
        for split in ("train", "val")
    }
    io.write_json(folder / "meta.json", {"dtype": "uint16", "vocab_size": vocab, "splits": splits})
    return folder


def train(a, tokens: Path, ckpt: Path | None = None, **overrides) -> dict:
    shape = GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.ctx, vocab_size=a.vocab)
    cfg = TrainConfig(
        max_steps=a.steps, batch_size=a.batch, warmup_steps=5, log_every=10, val_batches=2, checkpoint_every=0
    )
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(0)
    return fit(LitGPT(GPT(shape), cfg), cfg, tokens, seed=0, ckpt_dir=ckpt)


def loop_tokens_per_s(history: list[dict], a) -> float:
    """In-loop tokens/s after the first logged row (warm-up, compilation)."""
    first, last = history[0], history[-1]
    tokens = lambda r: r["step"] * a.batch * a.ctx  # noqa: E731
    return (tokens(last) - tokens(first)) / (
        tokens(last) / last["tokens_per_s"] - tokens(first) / first["tokens_per_s"]
    )


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--bar", type=float, default=0.9)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this checks the GPU paths")
    check("precision auto is bf16-mixed on a GPU", resolve_precision("auto", "auto") == "bf16-mixed")
    module = LitGPT(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=128)), TrainConfig())
    module.to("cuda")
    check("AdamW is fused on a GPU", module.configure_optimizers()["optimizer"].defaults["fused"] is True)
    peak = device_peak_flops()
    check("the GPU's spec peak is known", peak is not None, device=torch.cuda.get_device_name(), peak=peak)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = tokens_dir(Path(tmp), a.vocab)
        eager = train(a, tokens)
        rows = eager["history"]
        finite = all(math.isfinite(r["train_loss"]) for r in rows)
        check(
            "bf16 eager trains",
            finite and rows[-1]["train_loss"] < rows[0]["train_loss"] and "mfu" in rows[-1],
            tokens_per_s=round(loop_tokens_per_s(rows, a)),
            mfu=round(rows[-1].get("mfu", 0), 3),
            loss=[round(rows[0]["train_loss"], 3), round(rows[-1]["train_loss"], 3)],
        )
        compiled = train(a, tokens, compile=True)
        ours = loop_tokens_per_s(compiled["history"], a)
        check(
            "torch.compile trains",
            all(math.isfinite(r["train_loss"]) for r in compiled["history"]),
            tokens_per_s=round(ours),
            mfu=round(compiled["mfu"], 3),
        )
        ckpt, every = Path(tmp) / "ckpt", a.steps // 2
        sharded = train(a, tokens, ckpt, strategy="fsdp", checkpoint_every=every)
        saved = [step for step, _ in checkpoints.checkpoints(ckpt)]
        again = train(a, tokens, ckpt, strategy="fsdp", checkpoint_every=every)  # finds the run done
        check(
            "FSDP trains, checkpoints and resumes",
            math.isfinite(sharded["val_loss"]) and saved[-1] == a.steps and again["resumed_from_step"] == a.steps,
            val_loss=round(sharded["val_loss"], 3),
            checkpoints=saved,
        )
    shape = [f"--{k}={getattr(a, k)}" for k in SHAPE]
    ref = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ref_gpt.py")), *shape, "--compile=1", f"--peak={peak}"],
        capture_output=True,
        text=True,
        check=True,
    )
    reference = json.loads(ref.stdout.strip().splitlines()[-1])
    ratio = ours / reference["tokens_per_s"]
    figures = {"ours_tokens_per_s": round(ours), "reference_tokens_per_s": reference["tokens_per_s"]}
    figures |= {"reference_mfu": reference["mfu"], "ratio": round(ratio, 3), "bar": a.bar}
    print(json.dumps({"bench": "gpu_check", **figures, "bar_met": all(results) and ratio >= a.bar}))


if __name__ == "__main__":
    main()
