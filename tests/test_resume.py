"""A pretrain run killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run ends."""

import csv
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lm import checkpoints
from tiny import TINY

STEPS, EVERY = 300, 50
DRIVER = """
import json, sys
from stages.config import parse_params
from stages.pretrain import run
from stages.tracking import NO_TRACKING
p = parse_params(json.loads(sys.argv[1]))
print("resumed_from_step", run(p, NO_TRACKING)["resumed_from_step"])
"""
ROOT = Path(__file__).resolve().parents[1]


def params_for(out: Path, tokens: str) -> dict:
    train = TINY["pretrain"]["train"] | {"max_steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 2}
    paths = {k: str(out / k) for k in ("checkpoints", "plots", "metrics", "reports")}
    paths |= {"tokens": tokens, "models": str(out)}
    return {"paths": paths, "pretrain": {**TINY["pretrain"], "train": train}}


def start(params: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(params)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def curve(out: Path) -> list[dict]:
    with open(out / "plots" / "pretrain_loss.csv") as f:
        return [
            {"step": int(r["step"]), "train_loss": float(r["train_loss"]), "lr": float(r["lr"])}
            for r in csv.DictReader(f)
        ]


def test_killed_run_resumes_and_matches_an_uninterrupted_run(pipeline, tmp_path):
    p, _ = pipeline
    whole, killed = params_for(tmp_path / "whole", p.paths.tokens), params_for(tmp_path / "killed", p.paths.tokens)
    proc = start(whole)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    proc = start(killed)
    first = Path(killed["paths"]["checkpoints"]) / "pretrain" / f"step={2 * EVERY}.ckpt"
    deadline = time.monotonic() + 240
    while not (first.exists() and zipfile.is_zipfile(first)):
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "killed" / "pretrain").exists(), "killed before it finished"

    proc = start(killed)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    resumed_from = int(log.split("resumed_from_step")[-1])
    assert resumed_from >= 2 * EVERY and resumed_from % EVERY == 0 and resumed_from < STEPS

    whole_curve, resumed_curve = curve(tmp_path / "whole"), curve(tmp_path / "killed")
    assert [r["step"] for r in resumed_curve] == [r["step"] for r in whole_curve]
    for a, b in zip(whole_curve, resumed_curve, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-6) and b["lr"] == pytest.approx(
            a["lr"]
        )
    weights_a = load_file(tmp_path / "whole" / "pretrain" / "model.safetensors")
    weights_b = load_file(tmp_path / "killed" / "pretrain" / "model.safetensors")
    for name, tensor in weights_a.items():
        assert (weights_b[name] - tensor).abs().max().item() < 1e-5, name
    kept = [step for step, _ in checkpoints.checkpoints(Path(killed["paths"]["checkpoints"]) / "pretrain")]
    assert kept == [STEPS - EVERY, STEPS]


def test_a_different_run_does_not_resume_another_runs_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert checkpoints.resume_from(ckpt, {"lr": 1}) is None
    (ckpt / "step=10.ckpt").write_bytes(b"not a zip: a file cut short")
    assert checkpoints.resume_from(ckpt, {"lr": 1}) is None, "an incomplete file is never resumed from"
    with zipfile.ZipFile(ckpt / "step=5.ckpt", "w") as z:
        z.writestr("data", "x")
    assert checkpoints.resume_from(ckpt, {"lr": 1}) == str(ckpt / "step=5.ckpt")
    assert checkpoints.resume_from(ckpt, {"lr": 2}) is None and not list(ckpt.glob("*.ckpt"))
    assert json.loads((ckpt / "run.json").read_text()) == {"lr": 2}


def test_a_code_change_changes_the_fingerprint(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = checkpoints.code_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert checkpoints.code_digest(tmp_path / "pkg") != before


class Planted:
    """What a tampered checkpoint holds: unpickling it would create the file `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_pickle_in_the_checkpoints_is_refused_not_run(pipeline, tmp_path):
    """A checkpoint is loaded with torch.load(weights_only=True): one whose pickle would run code (here: create a
    file) stops the stage with the file named, and the code never runs."""
    import torch

    p, _ = pipeline
    params = params_for(tmp_path / "run", p.paths.tokens)
    params["pretrain"]["train"] |= {"max_steps": 6, "checkpoint_every": 3}
    proc = start(params)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    ckpt_dir = Path(params["paths"]["checkpoints"]) / "pretrain"
    for _, path in checkpoints.checkpoints(ckpt_dir):
        Path(path).unlink()
    ran = tmp_path / "the-payload-ran"
    torch.save({"state_dict": Planted(str(ran))}, ckpt_dir / "step=3.ckpt")  # what resume_from picks next
    proc = start(params)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and f"{ckpt_dir / 'step=3.ckpt'}: refused, not a plain checkpoint" in log, log
    assert not ran.exists(), "the planted code never ran"
