"""Curation on the engines a cluster runs, started here on 127.0.0.1: datatrove's Ray executor on a Ray cluster
with the data on an S3 server (moto), and its Slurm executor on a one-node Slurm cluster (Debian's slurm-wlm;
marker `cluster`, run by `make test-cluster`). The curated shards are byte-identical to the local executor's, and
a task that fails on a worker fails the stage with that task's error line. On Slurm, launch/train.sbatch trains
across srun's tasks."""

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import s3fs
from test_curate import edit, random_doc, write_raw
from test_ddp import ROOT, curve, pretrain_folder, run_pretrain

from flows.server import free_port
from flows.services import BUCKETS, s3_only
from lm import io
from stages import curate
from stages.config import Paths, parse_params
from stages.tracking import NO_TRACKING

RAY = Path(sys.executable).parent / "ray"
# Ray binds to the machine's outward address unless told that it is a one-machine cluster; and `ray start` turns
# on token auth, which a client given an address does not, when ~/.ray/auth_token exists (a local ray.init()
# writes one): the test's cluster and client say the mode, whatever this machine's home holds
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_only(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """`ray start --head` with 2 CPUs on 127.0.0.1; its workers see the S3 server as the stage does."""
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 characters
    env = os.environ | s3 | LOOPBACK_ONLY
    port = free_port()
    head = [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    subprocess.run([*head, "--disable-usage-stats", "--temp-dir", temp], env=env, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_s3(s3, monkeypatch):
    for key, value in (s3 | LOOPBACK_ONLY).items():
        monkeypatch.setenv(key, value)
    yield s3
    # fsspec keeps one S3 filesystem per set of arguments, and the endpoint came from the environment: a later
    # test's S3 server would be sent to this one
    s3fs.S3FileSystem.clear_instance_cache()


def texts() -> list[str]:
    rng = random.Random(3)
    originals = [random_doc(rng) for _ in range(60)]
    return originals + [edit(rng, t, 0.01) for t in originals[:10]] + [t.upper() for t in originals[10:15]]


def left_on_s3(url: str) -> list[str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with contextlib.suppress(FileNotFoundError):
        return fs.find(url)
    return []


def curate_into(root: Path, raw: Path, **overrides) -> tuple[dict, dict[str, bytes]]:
    """curate.run from raw into root/curated with 3 tasks; its metrics, and every curated file's bytes. MinHash in 4
    bands: 4 bucket tasks, not 12 (each Ray task costs seconds to place)."""
    cfg = {"min_chars": 1, "min_alpha_fraction": 0.0, "val_fraction": 0.2, "tasks": 3, "workers": 2} | overrides
    cfg["near_dedup"] = {"bands": 4, "rows": 5}
    paths = Paths(raw=str(raw), curated=str(root / "curated"), reports=str(root / "reports"), plots=str(root / "plots"))
    metrics = curate.run(dataclasses.replace(parse_params({"curate": cfg}), paths=paths), NO_TRACKING)
    passes = ["exact_signatures", "exact_duplicates", "filters", "minhash_signatures", "minhash_buckets"]
    assert list(metrics.pop("seconds")) == [*passes, "minhash_clusters", "split_and_write"], "each pass timed"
    files = {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / "curated").rglob("*.parquet"))}
    return metrics, files


def test_curate_on_ray_with_data_on_s3_writes_what_the_local_executor_writes(ray_cluster, on_s3, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    local = curate_into(tmp_path / "local", raw)
    work = f"s3://{BUCKETS['data']}/curate-work"
    on_ray = curate_into(tmp_path / "ray", raw, executor="ray", ray={"address": ray_cluster}, work_dir=work)
    assert on_ray == local
    metrics, files = on_ray
    assert len({name.split("-")[1] for name in files}) == 3, "three tasks wrote shards"
    assert metrics["train"]["documents"] + metrics["val"]["documents"] == 60
    assert not left_on_s3(work), "the run's work folder is left on S3"


def test_a_task_failing_on_a_ray_worker_fails_the_stage_with_its_error(ray_cluster, on_s3, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    bad = pd.read_parquet(raw / "part-00001.parquet").assign(id="not-a-content-hash")
    bad.to_parquet(raw / "part-00001.parquet", index=False)
    work = f"s3://{BUCKETS['data']}/curate-failing"
    with pytest.raises(io.DataError) as failure:
        curate_into(tmp_path, raw, executor="ray", ray={"address": ray_cluster}, work_dir=work)
    message = str(failure.value)
    print(message)
    assert message.startswith("curate: pass 1 on ray: 1 of 3 tasks did not finish; task 1: ")
    assert f"{work}/curate-" in message and "part-00001.parquet: does not match the raw documents schema" in message
    assert not (tmp_path / "curated").exists() and not left_on_s3(work)


SLURM_CONF = """ClusterName=llm-pipeline-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld and slurmd of one node (this machine, 2 CPUs, addressed as 127.0.0.1), each its own process
    group; yields the environment that points sbatch and squeue at it, and the controller's log."""
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's slurm-wlm and root, for slurmd (make test-cluster installs it)")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = SLURM_CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), user="root", root=root)
    (root / "slurm.conf").write_text(conf)
    env = os.environ | {"SLURM_CONF": str(root / "slurm.conf")}
    daemons = []
    for daemon in ("slurmctld", "slurmd"):
        with (root / f"{daemon}.log").open("w") as log:
            daemons.append(
                subprocess.Popen([daemon, "-D"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"SLURM_CONF": env["SLURM_CONF"]}, root / "slurmctld.log"
    finally:
        for proc in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in daemons:
            proc.wait(timeout=30)


@pytest.fixture
def on_slurm(slurm_cluster, monkeypatch):
    env, log = slurm_cluster
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return log


def submitted(log: Path) -> int:
    return log.read_text().count("_slurm_rpc_submit_batch_job")


@pytest.mark.cluster
def test_curate_on_slurm_writes_what_the_local_executor_writes(on_slurm, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    local = curate_into(tmp_path / "local", raw)
    before = submitted(on_slurm)
    on_slurm_run = curate_into(tmp_path / "slurm", raw, executor="slurm", slurm={"partition": "test", "poll_s": 1})
    assert on_slurm_run == local
    assert submitted(on_slurm) - before == 2 * 7, "each of the 7 passes: a task array and datatrove's stats job"
    assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), "jobs left queued"


@pytest.mark.cluster
def test_a_task_failing_on_slurm_fails_the_stage_with_its_error(on_slurm, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    bad = pd.read_parquet(raw / "part-00001.parquet").assign(id="not-a-content-hash")
    bad.to_parquet(raw / "part-00001.parquet", index=False)
    with pytest.raises(io.DataError) as failure:
        curate_into(tmp_path, raw, executor="slurm", slurm={"partition": "test", "poll_s": 1})
    message = str(failure.value)
    print(message)
    assert message.startswith("curate: pass 1 on slurm: 1 of 3 tasks did not finish; task 1: ")
    assert "part-00001.parquet: does not match the raw documents schema" in message
    assert not (tmp_path / "curated").exists()
    assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), "jobs left queued"


@pytest.mark.cluster
def test_train_sbatch_trains_on_two_slurm_tasks_as_lightning_on_two_processes(on_slurm, pipeline, tmp_path):
    """launch/train.sbatch: srun starts both ranks, Lightning reads them from Slurm; the loss curve is the one of
    the same run on 2 processes that Lightning starts itself."""
    p, _ = pipeline
    run_pretrain(tmp_path / "lightning", p.paths.tokens, devices=2, batch_size=4, strategy="ddp")
    job = tmp_path / "job"
    env = pretrain_folder(job, p.paths.tokens, batch_size=4, devices=2, strategy="ddp")
    (job / "launch").mkdir()
    shutil.copy(ROOT / "launch" / "train.sbatch", job / "launch")
    (job / ".venv").symlink_to(Path(sys.executable).parents[1])
    env |= {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    sbatch = [
        "sbatch",
        "--wait",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "launch/train.sbatch",
        "pretrain",
    ]
    proc = subprocess.run(sbatch, cwd=job, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(f.read_text()[-3000:] for f in job.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    losses = lambda rows: [(r["step"], r["train_loss"], r["grad_norm"], r["lr"]) for r in rows]  # noqa: E731
    assert losses(curve(job)) == losses(curve(tmp_path / "lightning"))
