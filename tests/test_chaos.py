"""Kill anything at any point. Each stage's command, started by `dvc repro`, is SIGKILLed at named points (early,
mid-write, just before its output is renamed in: tests/chaos/sitecustomize.py); the next `dvc repro` completes,
a deterministic stage's outputs are byte-identical to an uninterrupted run's (DVC then finds the whole pipeline
up to date), a training stage resumes on the same loss curve, no part-written output is ever in place, and no
temp is left behind. `make test` runs one of the cases, `make chaos` the whole matrix. And the
Prefect flow: killed mid-stage, its next run completes; beside a manual `dvc repro`, the second stops at once."""

import contextlib
import csv
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import sh

from stages import dvcfile

CHAOS = Path(__file__).parent / "chaos"
TRAINING = ("pretrain", "distill", "scratch")
# evaluate's report holds timings; quantize's int8 file does not repeat byte for byte: safetensors writes its
# metadata map (torchao's per-tensor entries) in hash order
DETERMINISTIC = ("sources", "ingest", "curate", "tokenize", "prune")
CHECKPOINT_SAVE = "lightning.pytorch.callbacks.model_checkpoint:ModelCheckpoint._save_checkpoint"
# stage -> {point: (function, nth call)}: calls count when a path argument lies in one of the stage's outputs
# or their temps; an early point counts every call, and the rename point only the stage's cached outputs.
# Early: the sources listed, the output's temp made, a shard read, a model loaded or a second checkpoint due.
POINTS = {
    "sources": {"early": ("lm.sources:fingerprint", 1), "mid-write": ("pathlib:Path.write_text", 1)},
    "ingest": {"early": ("lm.io:atomic_dir", 1), "mid-write": ("lm.tables:write_shard", 2)},
    "curate": {"early": ("lm.tables:read_shard", 1), "mid-write": ("lm.tables:write_shard", 2)},
    "tokenize": {"early": ("lm.tables:iter_shards", 1), "mid-write": ("lm.io:write_json", 1)},
    **{stage: {"early": (CHECKPOINT_SAVE, 2), "mid-write": ("lm.model_dir:save", 1)} for stage in TRAINING},
    "prune": {"early": ("lm.model_dir:load", 1), "mid-write": ("lm.model_dir:save", 2)},
    "quantize": {"early": ("lm.model_dir:load", 1), "mid-write": ("lm.model_dir:save", 2)},
    "evaluate": {"early": ("lm.model_dir:load", 1), "mid-write": ("lm.io:write_json", 1)},
}
for points in POINTS.values():
    points["rename"] = ("os:replace", 1)
MATRIX = [(stage, point) for stage, points in POINTS.items() for point in points]
# what make test runs: mid-write in curate (a data stage, and datatrove's processes); a training run killed and
# resumed is tested in test_resume.py and test_team.py too
QUICK = [("curate", "mid-write")]
FULL = os.environ.get("CHAOS_MATRIX") == "full"


def tree_digest(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): f.read_bytes() for f in files}


def leftovers(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if p.suffix in (".tmp", ".old") and ".dvc" not in p.relative_to(root).parts
    )


def stale(ws: Path, env: dict) -> set[str]:
    """The stages DVC would run, less `sources`, which runs every time."""
    status = subprocess.run(["dvc", "status", "--json"], cwd=ws, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(status.stdout)) - {"sources"}  # stderr may warn of a dead process's lock entries


def curve(text: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row["train_loss"])) for row in csv.DictReader(text.splitlines())]


@dataclasses.dataclass
class Workspace:
    """A copy of the session's repo after an uninterrupted `dvc repro`: the reference each kill is compared
    with. Not committed anew, so that a rerun records the same git commit in its model cards."""

    root: Path
    env: dict
    stages: dict[str, dvcfile.Stage]
    reference: dict[str, dict[str, dict[str, bytes]]]  # stage -> output -> its files' bytes

    def reset(self) -> None:
        """Back to the reference: dvc.lock, params.yaml and the uncached outputs rewritten, the rest checked out."""
        for stage in self.stages.values():
            for out in stage.outs:
                if out not in cached_outs(self.root, stage.name):
                    (self.root / out).write_bytes(self.reference[stage.name][out]["."])
        for name in ("dvc.lock", "params.yaml"):
            (self.root / name).write_bytes(self.reference["."][name]["."])
        sh("dvc", "checkout", "--force", cwd=self.root, env=self.env)


@pytest.fixture(scope="module")
def workspace(repo, tmp_path_factory) -> Workspace:
    src, env, _ = repo
    ws = tmp_path_factory.mktemp("chaos") / "ws"
    shutil.copytree(src, ws, symlinks=True)
    env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    sh("dvc", "repro", cwd=ws, env=env)  # whatever other tests did to the session's repo
    stages = dvcfile.stages(yaml.safe_load((ws / "params.yaml").read_text()), ws)
    reference = {name: {out: tree_digest(ws / out) for out in stage.outs} for name, stage in stages.items()}
    reference["."] = {name: tree_digest(ws / name) for name in ("dvc.lock", "params.yaml")}
    return Workspace(ws, env, stages, reference)


def cached_outs(ws: Path, stage: str) -> list[str]:
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][stage]
    tree = yaml.safe_load((ws / "params.yaml").read_text())
    declared = dvcfile.stages(tree, ws)[stage].outs
    return list(declared[: len(spec.get("outs", []))])


@pytest.mark.parametrize(("stage", "point"), MATRIX if FULL else QUICK)
def test_a_stage_killed_at_any_point_completes_on_the_next_repro_as_if_never_killed(workspace, stage, point):
    ws, env, stages, reference = workspace.root, workspace.env, workspace.stages, workspace.reference
    call, nth = POINTS[stage][point]
    scope = [] if point == "early" else cached_outs(ws, stage) if point == "rename" else list(stages[stage].outs)
    fired = ws.parent / "fired.json"
    fired.unlink(missing_ok=True)
    shutil.rmtree(ws / "checkpoints" / stage, ignore_errors=True)  # the killed run trains from the start
    spec = {"stage": stage, "call": call, "nth": nth, "outputs": [str(ws / out) for out in scope]}
    spec |= {"exact": point == "rename", "fired": str(fired)}  # renamed onto an output, not within a temp
    chaos_env = env | {"PYTHONPATH": f"{CHAOS}{os.pathsep}{ws}", "CHAOS_KILL": json.dumps(spec)}
    # within the timeout: nothing the stage started outlives it holding its output pipes
    killed = subprocess.run(
        ["dvc", "repro", "--force", "--single-item", stage],
        cwd=ws,
        env=chaos_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode != 0 and fired.exists(), f"not killed at {point}:\n{killed.stdout[-3000:]}{killed.stderr}"

    for out in cached_outs(ws, stage):  # what the next stage could read: nothing, or a whole output
        assert not (ws / out).exists() or tree_digest(ws / out) == reference[stage][out], f"{out} part-written"
    assert stage in stale(ws, env) or stage == "sources", "DVC knows the stage must run again"

    # forced, as the killed run was: DVC would otherwise check the reference's outputs out of its cache
    log = sh("dvc", "repro", "--force", "--single-item", stage, cwd=ws, env=env)
    assert f"Running stage '{stage}'" in log
    assert not leftovers(ws), "the rerun removes the killed run's temps"
    if stage in TRAINING:
        plot = f"plots/{stage}_loss.csv"
        resumed, whole = curve((ws / plot).read_text()), curve(reference[stage][plot]["."].decode())
        assert [s for s, _ in resumed] == [s for s, _ in whole]
        for (_, a), (_, b) in zip(resumed, whole, strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    if stage in DETERMINISTIC:
        for out in cached_outs(ws, stage):
            assert tree_digest(ws / out) == reference[stage][out], f"{out} differs from an uninterrupted run's"
        assert not stale(ws, env), "the outputs are the reference's: nothing downstream is stale"
    else:
        assert stage not in stale(ws, env), "DVC recorded the completed run"
        workspace.reset()  # for the next case


FLOW = "import sys; from flows.pipeline import pipeline; print(pipeline(repo=sys.argv[1]))"


def start_flow(ws: Path, env: dict, prefect: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FLOW, str(ws)],
        cwd=ws,
        env=env | prefect,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stage_process(parent: psutil.Process, stage: str, timeout: float = 300) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                if f"-m stages {stage}" in " ".join(child.cmdline()):
                    return child
        assert parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE, f"{stage} never started"
        time.sleep(0.2)
    raise AssertionError(f"{stage} did not start in {timeout:.0f} s")


BUMPS = itertools.count(1)


def ended(proc: psutil.Process, timeout: float) -> bool:
    """Whether proc ended within timeout (a zombie has: only its exit status is left for its parent to read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def evaluate_stale(workspace: Workspace) -> None:
    """evaluate made stale by a params value no run was made with (neither dvc.lock nor the run-cache has it)."""
    tree = yaml.safe_load((workspace.root / "params.yaml").read_text())
    tree["evaluate"]["latency_tokens"] += next(BUMPS)
    (workspace.root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


def held(ws: Path, env: dict, stage: str) -> tuple[dict, Path]:
    """env in which the stage's command waits, at its first model load, until the returned file exists: so it is
    still running whatever the test starts beside it, however fast the machine."""
    release = ws.parent / "release"
    release.unlink(missing_ok=True)
    spec = {"stage": stage, "call": "lm.model_dir:load", "nth": 1, "outputs": []}
    spec |= {"fired": str(ws.parent / "held.json"), "release": str(release)}
    return env | {"PYTHONPATH": f"{CHAOS}{os.pathsep}{ws}", "CHAOS_KILL": json.dumps(spec)}, release


def test_flow_runs_beside_dvc_repro_and_a_flow_killed_mid_stage(workspace, prefect_server):
    """A flow run (as a schedule starts one) while `dvc repro` runs a stage; `dvc repro` and a second flow run
    while a flow run runs a stage: each second one stops at once, naming the lock, and the first completes. A
    flow run killed mid-stage takes its stage command with it, and the next run completes."""
    ws, env = workspace.root, workspace.env
    try:
        evaluate_stale(workspace)
        holding, release = held(ws, env, "evaluate")
        manual = subprocess.Popen(["dvc", "repro"], cwd=ws, env=holding, stdout=subprocess.PIPE, text=True)
        stage_process(psutil.Process(manual.pid), "evaluate")
        scheduled = start_flow(ws, env, prefect_server)
        log = scheduled.communicate(timeout=300)[0]
        assert scheduled.returncode != 0 and f"RuntimeError: {ws} is busy: " in log, log[-3000:]
        assert "stops before any stage work" in log and manual.poll() is None, "it stopped while the repro ran"
        release.touch()
        assert manual.wait(timeout=600) == 0 and not stale(ws, env)

        evaluate_stale(workspace)
        holding, release = held(ws, env, "evaluate")
        flow = start_flow(ws, holding, prefect_server)
        stage = stage_process(psutil.Process(flow.pid), "evaluate")
        manual = subprocess.run(["dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert manual.returncode != 0 and "Unable to acquire lock" in manual.stderr, manual.stderr[-3000:]
        second = start_flow(ws, env, prefect_server)
        log = second.communicate(timeout=300)[0]
        assert second.returncode != 0 and f"RuntimeError: {ws} is busy: " in log, log[-3000:]
        assert stage.is_running(), "the first flow run's stage went on"
        flow.kill()
        flow.wait()
        assert ended(stage, timeout=30), "the stage ends with the flow, rather than race the next run"
        assert "evaluate" in stale(ws, env), "the killed run recorded nothing"

        # what a runner sends a flow run it cancels or leaves on shutdown, with 30 s before its SIGKILL
        tree = yaml.safe_load((ws / "params.yaml").read_text())
        tree["run"] |= {"retries": 1, "retry_delay_s": 0}  # flow settings only: no stage depends on them
        (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        flow = start_flow(ws, holding, prefect_server)
        stage = stage_process(psutil.Process(flow.pid), "evaluate")
        flow.terminate()
        log = flow.communicate(timeout=20)[0]
        assert flow.returncode != 0 and ended(stage, timeout=5), f"the flow stops its stage and exits:\n{log[-3000:]}"
        assert "evaluate" in stale(ws, env), "DVC's lock is free at once, and the stopped run recorded nothing"
        assert " - Retry 1/1 will start" not in log, "a stopped flow run retries no stage"

        rerun = start_flow(ws, env, prefect_server)
        log = rerun.communicate(timeout=600)[0]
        assert rerun.returncode == 0 and "'evaluate': 'ran'" in log, log[-3000:]
        assert not stale(ws, env) and not leftovers(ws)
    finally:
        (ws.parent / "release").touch()  # nothing left held
        workspace.reset()
