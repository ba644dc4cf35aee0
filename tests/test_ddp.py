"""DDP on 2 CPU processes (gloo) through the real stage entry point equals one process with the same global batch;
across two nodes launched by torchrun (on 127.0.0.1, each in its own folder, sharing a checkpoint folder), a run
killed after a checkpoint resumes on the uninterrupted run's loss curve (launched by launch/torchrun.sh)."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.server import free_port
from lm.config import ConfigError, TrainConfig
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]


def pretrain_folder(out: Path, tokens: str, checkpoints: str = "checkpoints", **train) -> dict:
    """A working folder for the pretrain stage (params.yaml, dvc.yaml); returns the environment to run it in."""
    train = TINY["pretrain"]["train"] | {"max_steps": 20, "accelerator": "cpu", "checkpoint_every": 0} | train
    params = {"paths": {"tokens": tokens, "checkpoints": checkpoints}, "pretrain": {**TINY["pretrain"], "train": train}}
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", out)  # the stage reads its inputs and outputs there
    return os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}


def run_pretrain(out: Path, tokens: str, devices: int, batch_size: int, strategy: str) -> None:
    env = pretrain_folder(out, tokens, batch_size=batch_size, devices=devices, strategy=strategy)
    proc = subprocess.run(  # dvc.yaml's command: Lightning restarts it for the other rank
        [sys.executable, "-m", "stages", "pretrain"], cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def curve(out: Path) -> list[dict]:
    with open(out / "plots" / "pretrain_loss.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp_run(pipeline, tmp_path_factory) -> Path:
    """The pretrain stage on 2 processes that Lightning starts, 4 windows each: its working folder."""
    out = tmp_path_factory.mktemp("lightning") / "ddp"
    run_pretrain(out, pipeline[0].paths.tokens, devices=2, batch_size=4, strategy="ddp")
    return out


def test_ddp_two_processes_equal_one_process_with_the_global_batch(pipeline, ddp_run, tmp_path):
    p, _ = pipeline
    run_pretrain(tmp_path / "single", p.paths.tokens, devices=1, batch_size=8, strategy="auto")
    ddp, single = curve(ddp_run), curve(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == ["5", "10", "15", "20"]
    for a, b in zip(ddp, single, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))
    mlflow.set_tracking_uri(f"sqlite:///{ddp_run / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["llm-pipeline"], output_format="list")
    assert len(runs) == 1, "only rank zero tracks"
    assert (ddp_run / "models" / "pretrain" / "model.safetensors").exists()


def torchrun_two_nodes(folders: list[Path], tokens: str, checkpoints: Path, kill: dict | None = None) -> list[int]:
    """launch/torchrun.sh pretrain on two nodes (one process each), each node a folder of its own, on 127.0.0.1
    (gloo on the loopback); kill: a tests/chaos kill point armed in both ranks. Returns each node's exit code."""
    port, nodes = free_port(), []
    for rank, folder in enumerate(folders):
        if not folder.exists():
            train = {"batch_size": 4, "num_nodes": 2, "strategy": "ddp", "checkpoint_every": 5}
            pretrain_folder(folder, tokens, str(checkpoints), **train)
            (folder / "launch").mkdir()
            shutil.copy(ROOT / "launch" / "torchrun.sh", folder / "launch")  # it runs in its checkout's root
        env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GLOO_SOCKET_IFNAME": "lo"}
        env |= {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if kill:
            env |= {"PYTHONPATH": f"{ROOT / 'tests' / 'chaos'}:{ROOT}", "DVC_STAGE": "pretrain"}
            env |= {"CHAOS_KILL": json.dumps(kill | {"stage": "pretrain", "fired": str(folder / "fired")})}
        log = (folder / f"torchrun-{len(list(folder.glob('torchrun-*')))}.log").open("w")
        script = [str(folder / "launch" / "torchrun.sh"), "pretrain"]
        nodes.append(subprocess.Popen(script, env=env, stdout=log, stderr=log, start_new_session=True))
    try:
        return [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)


def test_two_nodes_killed_after_a_checkpoint_resume_on_the_uninterrupted_curve(pipeline, ddp_run, tmp_path):
    """The uninterrupted run: the same 2 ranks of 4 windows each, started by Lightning on one machine."""
    p, _ = pipeline
    tokens = p.paths.tokens
    killed = [tmp_path / "node-0", tmp_path / "node-1"]
    # both ranks die as their second checkpoint (step 10) is due: step 5's is on the shared folder
    save = {"call": "lightning.pytorch.trainer.trainer:Trainer.save_checkpoint", "nth": 2, "outputs": []}
    assert torchrun_two_nodes(killed, tokens, tmp_path / "shared-ckpt", kill=save) != [0, 0], logs(killed)
    assert all((folder / "fired").exists() for folder in killed), "a rank was not killed at the checkpoint"
    assert sorted(p.name for p in (tmp_path / "shared-ckpt" / "pretrain").iterdir()) == ["run.json", "step=5.ckpt"]
    assert torchrun_two_nodes(killed, tokens, tmp_path / "shared-ckpt") == [0, 0], logs(killed)
    assert json.loads((killed[0] / "metrics" / "pretrain.json").read_text())["resumed_from_step"] == 5
    resumed, uninterrupted = curve(killed[0]), curve(ddp_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == ["5", "10", "15", "20"]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
    # rank zero alone writes outputs
    assert not any((killed[1] / out).exists() for out in ("models", "plots", "metrics", "checkpoints")), killed[1]


def logs(folders: list[Path]) -> str:
    return "\n".join(f"{log}:\n{log.read_text()[-2500:]}" for folder in folders for log in folder.glob("torchrun-*"))


def test_fsdp_without_a_gpu_fails_with_one_line(pipeline, tmp_path):
    p, _ = pipeline
    with pytest.raises(ConfigError, match="strategy: fsdp shards the model across GPUs; with accelerator: cpu"):
        TrainConfig(strategy="fsdp", accelerator="cpu")
    env = pretrain_folder(tmp_path / "fsdp", p.paths.tokens, strategy="fsdp", accelerator="auto")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=tmp_path / "fsdp", env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "pretrain failed: strategy: fsdp shards the model across GPUs, and this machine has none" in proc.stderr
