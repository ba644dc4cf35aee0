"""DDP on 2 CPU processes (gloo) through the real stage entry point equals one process with the same global batch."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]


def run_pretrain(out: Path, tokens: str, devices: int, batch_size: int, strategy: str) -> None:
    train = TINY["pretrain"]["train"] | {
        "max_steps": 20,
        "batch_size": batch_size,
        "devices": devices,
        "strategy": strategy,
        "accelerator": "cpu",
        "checkpoint_every": 0,
    }
    params = {"paths": {"tokens": tokens}, "pretrain": {**TINY["pretrain"], "train": train}}
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", out)  # the stage reads its inputs and outputs there
    env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def curve(out: Path) -> list[dict]:
    with open(out / "plots" / "pretrain_loss.csv") as f:
        return list(csv.DictReader(f))


def test_ddp_two_processes_equal_one_process_with_the_global_batch(pipeline, tmp_path):
    p, _ = pipeline
    run_pretrain(tmp_path / "ddp", p.paths.tokens, devices=2, batch_size=4, strategy="ddp")
    run_pretrain(tmp_path / "single", p.paths.tokens, devices=1, batch_size=8, strategy="auto")
    ddp, single = curve(tmp_path / "ddp"), curve(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == ["5", "10", "15", "20"]
    for a, b in zip(ddp, single, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'ddp' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["llm-pipeline"], output_format="list")
    assert len(runs) == 1, "only rank zero tracks"
    assert (tmp_path / "ddp" / "models" / "pretrain" / "model.safetensors").exists()
