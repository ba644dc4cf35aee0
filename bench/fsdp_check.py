"""FSDP across 2 GPUs saves a whole model: train a few steps with strategy fsdp on 2 devices, save the model
directory, load it back, and compare its logits with the gathered model's on val windows.

    python bench/fsdp_check.py [--layers 4 --dim 256 --heads 4 --ctx 256 --vocab 4096 --batch 8 --steps 20]

Needs 2 CUDA GPUs (Lightning starts the second process itself); with fewer it prints a skipped line and exits 0.
Ends with one JSON line: max_abs_diff of the logits, the saved tensors' shapes against the model's, bar_met.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check import tokens_dir  # noqa: E402
from lm import model_dir  # noqa: E402
from lm.config import GPTConfig, TrainConfig  # noqa: E402
from lm.gpt import GPT  # noqa: E402
from lm.lit import LitGPT  # noqa: E402
from lm.tokens import load_tokens  # noqa: E402
from lm.train import fit  # noqa: E402

SHAPE = {"layers": 4, "dim": 256, "heads": 4, "ctx": 256, "vocab": 4096, "batch": 8, "steps": 20}


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    if torch.cuda.device_count() < 2:
        print(json.dumps({"bench": "fsdp_check", "skipped": f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}"}))
        return
    # a fixed folder: Lightning's second process runs this script again and must find the same tokens
    folder = Path(tempfile.gettempdir()) / "llm-pipeline-fsdp-check"
    folder.mkdir(exist_ok=True)
    tokens = tokens_dir(folder, a.vocab)
    shape = GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.ctx, vocab_size=a.vocab)
    cfg = TrainConfig(
        max_steps=a.steps,
        batch_size=a.batch,
        warmup_steps=2,
        log_every=5,
        val_batches=2,
        checkpoint_every=0,
        devices=2,
        strategy="fsdp",
        accelerator="gpu",
    )
    torch.manual_seed(0)
    module = LitGPT(GPT(shape), cfg)
    result = fit(module, cfg, tokens, seed=0)
    if result is None:
        return  # the second rank: rank zero checks
    whole = module.model.cpu().float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        # random tokens have no tokenizer: any file stands in for it, the weights are what is checked
        model_dir.save(whole, Path(tmp) / "model", folder / "meta.json", {"name": "fsdp-check"})
        loaded = model_dir.load(Path(tmp) / "model").eval()
    windows = torch.from_numpy(load_tokens(tokens, "val")[: 4 * a.ctx].astype("int64")).view(4, a.ctx)
    with torch.no_grad():
        diff = (whole(windows) - loaded(windows)).abs().max().item()
    shapes_whole = all(p.shape == q.shape for p, q in zip(whole.parameters(), GPT(shape).parameters(), strict=True))
    print(
        json.dumps(
            {
                "bench": "fsdp_check",
                "val_loss": round(result["val_loss"], 4),
                "max_abs_diff": diff,
                "whole_shapes": shapes_whole,
                "bar_met": diff <= 1e-5 and shapes_whole and result["val_loss"] < 9.0,
            }
        )
    )


if __name__ == "__main__":
    main()
