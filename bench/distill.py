"""What a user waits for: `python -m stages distill` (dvc.yaml's command) as a whole process (default params, the
pretrained teacher, real tokens, MLflow tracking and checkpoints on) against bench/ref_distill.py (a plain
PyTorch distillation loop, the same loss terms, nanoGPT's batches) as a whole process, for the same steps, shapes
and tokens.

    python bench/distill.py [--steps 300 --tokens data/tokens --teacher models/pretrain]   # after `dvc repro pretrain`

Ends with one JSON line: each side's wall seconds and tokens/s over the whole process, the in-loop tokens/s, our
MFU (student training and teacher forward), ratio (ours / reference tokens/s, whole process) and bar_met.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pretrain import ROOT, WARMUP, race, reference_tokens, workspace

from lm import model_dir
from stages.config import load_params


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    cfg = params.distill
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=cfg.train.max_steps)
    p.add_argument("--tokens", default=str(ROOT / params.paths.tokens))
    p.add_argument("--teacher", default=str(ROOT / params.paths.model("pretrain")))
    p.add_argument("--bar", type=float, default=0.9)
    a = p.parse_args()
    tokens, teacher_dir = Path(a.tokens).resolve(), Path(a.teacher).resolve()
    if not (teacher_dir / "config.json").exists():
        raise SystemExit(f"{teacher_dir}: no model; make the teacher first: dvc repro pretrain")
    student, teacher = cfg.student, model_dir.read_config(teacher_dir)["model"]
    vocab = teacher["vocab_size"]
    tokens_run = a.steps * cfg.train.batch_size * student.block_size
    with tempfile.TemporaryDirectory() as tmp, reference_tokens(tokens) as flat:
        folder = Path(tmp)
        workspace(folder, tokens, a.steps, models={"pretrain": teacher_dir})
        ref_cmd = [sys.executable, str(ROOT / "bench" / "ref_distill.py"), f"--data={flat}"]
        ref_cmd += [f"--layers={student.n_layer}", f"--dim={student.n_embd}", f"--heads={student.n_head}"]
        ref_cmd += [f"--t-layers={teacher['n_layer']}", f"--t-dim={teacher['n_embd']}"]
        ref_cmd += [f"--t-heads={teacher['n_head']}", f"--ctx={student.block_size}", f"--vocab={vocab}"]
        ref_cmd += [f"--batch={cfg.train.batch_size}", f"--steps={a.steps - WARMUP}", f"--alpha={cfg.alpha}"]
        ref_cmd += [f"--attention-weight={cfg.attention_weight}"]
        figures = race("distill", ref_cmd, folder, tokens_run)
    print(
        json.dumps(
            {"bench": "distill", **figures, "bar": a.bar, "bar_met": figures["ratio"] >= a.bar, "steps": a.steps}
        )
    )


if __name__ == "__main__":
    main()
