"""Quality per CPU-second: our pretrain stage (default params) against bench/ref_quality.py (a plain loop with
nanoGPT's defaults for learning rate, warmup and schedule), each training for the same wall-clock budget on the
same tokens, the same shape and batch; then each one's val loss over the same val windows.

    python bench/quality.py [--budget 120 --tokens data/tokens]   # after `dvc repro tokenize`

Each side's speed is measured first (a short run), and its step count set to fill the budget; both schedules end
at that step. Ends with one JSON line: each side's steps, training seconds and val loss, ratio (reference val
loss / ours: above 1, ours is lower) and bar_met (our val loss <= the reference's).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pretrain import ROOT, reference_tokens, timed, workspace

from lm import io
from lm.train import resolve_shape
from stages.config import load_params

CALIBRATION_STEPS = 30


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=120.0, help="training seconds for each side")
    p.add_argument("--tokens", default=str(ROOT / params.paths.tokens))
    a = p.parse_args()
    tokens = Path(a.tokens).resolve()
    with reference_tokens(tokens) as flat:
        compare(a, tokens, flat)


def compare(a: argparse.Namespace, tokens: Path, flat: str) -> None:
    """Each side trains for about a.budget seconds (steps sized from a short calibration run of each)."""
    params = load_params(ROOT / "params.yaml")
    shape, train = params.pretrain.model, params.pretrain.train
    vocab = resolve_shape(shape, tokens).vocab_size  # as the stage sizes it
    tokens_per_step = train.batch_size * shape.block_size
    ref = [sys.executable, str(ROOT / "bench" / "ref_quality.py"), f"--data={flat}", f"--vocab={vocab}"]
    ref += [f"--layers={shape.n_layer}", f"--dim={shape.n_embd}", f"--heads={shape.n_head}"]
    ref += [f"--ctx={shape.block_size}", f"--batch={train.batch_size}"]
    ref += [f"--val-tokens={train.val_batches * tokens_per_step}", f"--seed={params.run.seed}"]

    def reference(steps: int) -> dict:
        return json.loads(timed([*ref, f"--steps={steps}"], ROOT)[1].strip().splitlines()[-1])

    def ours(steps: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            workspace(Path(tmp), tokens, steps)
            timed([sys.executable, "-m", "stages", "pretrain"], Path(tmp))
            return io.read_json(Path(tmp) / "metrics" / "pretrain.json")

    def steps_in_budget(tokens_per_s: float) -> int:
        return max(CALIBRATION_STEPS, round(a.budget * tokens_per_s / tokens_per_step))

    ref_steps = steps_in_budget(reference(CALIBRATION_STEPS)["tokens_per_s"])
    our_steps = steps_in_budget(ours(CALIBRATION_STEPS)["tokens_per_s"])
    theirs, mine = reference(ref_steps), ours(our_steps)
    figures = {
        "ours_steps": our_steps,
        "reference_steps": ref_steps,
        "ours_train_s": round(mine["train_seconds"], 1),
        "reference_train_s": theirs["train_seconds"],
        "ours_val_loss": round(mine["val_loss"], 4),
        "reference_val_loss": theirs["val_loss"],
        "ratio": round(theirs["val_loss"] / mine["val_loss"], 4),
    }
    bar_met = mine["val_loss"] <= theirs["val_loss"]
    print(json.dumps({"bench": "quality", **figures, "budget_s": a.budget, "bar_met": bar_met}))


if __name__ == "__main__":
    main()
