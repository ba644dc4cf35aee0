"""A team's set-up on real services started here on 127.0.0.1 (flows/services.py): PostgreSQL, an S3 server
(moto), the MLflow server (PostgreSQL, artifacts on S3) and the Prefect server (PostgreSQL). A second machine
restores what the first computed, artifacts live on the server's store, and ingest reads every format from S3."""

import contextlib
import gzip
import hashlib
import io as stdio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import fsspec
import httpx
import mlflow
import pandas as pd
import psutil
import pytest
import yaml
import zstandard
from conftest import ROOT, finished_runs, latest_artifact, prefect_at, prefect_cli, sh

from flows.services import BUCKETS, STATE, running, start_mlflow, stop_service
from lm import model_dir
from stages import ingest
from stages.config import IngestConfig, Params, Paths, Source, load_params, merge
from stages.tracking import NO_TRACKING
from tiny import TINY

DOCS = ["First document, from S3.", "Second one: caf\u00e9.", "Third\twith a tab."]


@pytest.fixture(scope="module")
def services_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="module")
def services(services_dir):
    with running(services_dir) as env:
        yield env


@pytest.fixture
def on_services(services, monkeypatch):
    """This process pointed at the services, as an exported environment would."""
    for key, value in services.items():
        monkeypatch.setenv(key, value)
    return services


def test_every_service_listens_on_the_loopback_only(services, services_dir):
    state = json.loads((services_dir / STATE).read_text())
    postmaster = int((Path(state["postgres"]) / "cluster" / "postmaster.pid").read_text().split()[0])
    listening = {}
    for root in [*map(psutil.Process, state["pids"].values()), psutil.Process(postmaster)]:
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker or backend that ended meanwhile
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listening[f"{' '.join(root.cmdline()[:4])}: port {conn.laddr.port}"] = conn.laddr.ip
    assert len(listening) >= 4 and set(listening.values()) == {"127.0.0.1"}, listening


def s3_client(env: dict):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def secrets_of(env: dict) -> list[str]:
    return [env["AWS_SECRET_ACCESS_KEY"], env["LLM_PIPELINE_POSTGRES"].split(":")[2].split("@")[0]]


def assert_no_secrets(env: dict, texts: list[str], where: str) -> None:
    leaked = [s for s in secrets_of(env) if any(s in text for text in texts)]
    assert not leaked, f"credentials in {where}"


def files_under(*folders: Path) -> list[str]:
    return [p.read_text(errors="replace") for folder in folders for p in folder.rglob("*") if p.is_file()]


def test_ingest_reads_every_format_from_s3(on_services, tmp_path):
    fs = fsspec.filesystem("s3")
    root = f"{BUCKETS['data']}/formats"
    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    parquet, csv = stdio.BytesIO(), stdio.BytesIO()
    pd.DataFrame({"text": DOCS}).to_parquet(parquet)
    pd.DataFrame({"text": DOCS}).to_csv(csv, index=False)
    files = {
        "a.txt": DOCS[0].encode(),
        "b.jsonl": lines,
        "c.jsonl.gz": gzip.compress(lines),
        "d.jsonl.zst": zstandard.ZstdCompressor().compress(lines),
        "e.parquet": parquet.getvalue(),
        "f.csv": csv.getvalue(),
    }
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    fs.invalidate_cache()
    for name in files:
        cfg = IngestConfig(sources=(Source(path=f"s3://{root}/{name}", name=name),))
        metrics = ingest.run(
            Params(ingest=cfg, paths=Paths(raw=str(tmp_path / name), checkpoints=str(tmp_path / "checkpoints"))),
            NO_TRACKING,
        )
        assert metrics["documents"] == (1 if name.endswith(".txt") else 3), name


def tiny_repo(root: Path, tokens: str, overrides: dict | None = None) -> Path:
    """A folder where a stage runs as DVC runs it: dvc.yaml, and tiny params over the pipeline fixture's tokens."""
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root)
    params = merge({"paths": {"tokens": tokens}, "pretrain": TINY["pretrain"]}, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_stage_artifacts_live_on_the_server_and_an_alias_loads_elsewhere(pipeline, services, tmp_path):
    p, _ = pipeline
    work = tiny_repo(tmp_path / "machine1", p.paths.tokens)
    env = os.environ | services | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (work / "mlartifacts").exists(), "nothing of MLflow's on the machine that ran the stage"
    keys = [o["Key"] for o in s3_client(services).list_objects_v2(Bucket=BUCKETS["artifacts"])["Contents"]]
    assert any("/models/m-" in k and k.endswith("/artifacts/model.safetensors") for k in keys), "the logged model"
    assert any(k.endswith("pretrain_loss.csv") for k in keys)
    for secret in secrets_of(services):
        assert secret not in proc.stdout + proc.stderr, "credentials never reach a log"
    mlflow.set_tracking_uri(services["MLFLOW_TRACKING_URI"])
    [run] = mlflow.search_runs(experiment_names=["llm-pipeline"], output_format="list")
    logged = json.dumps([run.data.params, run.data.tags])
    assert not [s for s in secrets_of(services) if s in logged], "nor MLflow params or tags"
    # another machine: only the tracking server's address and the S3 credentials
    elsewhere = tmp_path / "machine2"
    elsewhere.mkdir()
    download = (
        "import mlflow, sys; "
        "print(mlflow.artifacts.download_artifacts('models:/llm-pipeline@pretrain', dst_path=sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", download, str(elsewhere / "teacher")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,  # MLflow retries a failing download for good
    )
    model = model_dir.load(proc.stdout.strip().splitlines()[-1])
    assert model.config == model_dir.load(work / "models" / "pretrain").config


def test_no_run_or_step_metric_is_lost_when_the_tracking_server_dies_mid_training(
    pipeline, services, services_dir, tmp_path
):
    p, _ = pipeline
    train = {"max_steps": 300, "log_every": 5}
    work = tiny_repo(
        tmp_path / "machine", p.paths.tokens, {"run": {"experiment": "outage"}, "pretrain": {"train": train}}
    )
    env = os.environ | services | {"PYTHONPATH": str(ROOT)}
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    client = mlflow.MlflowClient(services["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 120
    while not (runs := client.search_runs(
        [e.experiment_id for e in client.search_experiments(filter_string="name = 'outage'")]
    )) or "train_loss" not in runs[0].data.metrics:  # fmt: skip
        assert stage.poll() is None and time.monotonic() < deadline, "the stage logs its first steps"
        time.sleep(0.5)
    stop_service(services_dir, "mlflow")
    log = stage.communicate(timeout=300)[0].decode()
    assert stage.returncode == 0, log[-3000:]
    assert "the rest of the run is spooled to" in log and "Traceback" not in log, log[-3000:]
    [spooled] = (work / ".mlflow-spool").iterdir()
    assert_no_secrets(services, files_under(spooled), "the spool")

    start_mlflow(services_dir, services)
    sync = subprocess.run(
        [sys.executable, "-m", "stages.tracking", "sync"], cwd=work, env=env, capture_output=True, text=True
    )
    assert sync.returncode == 0 and "1 spooled run(s) replayed" in sync.stdout, sync.stderr[-3000:]
    assert not spooled.exists()
    [run] = client.search_runs([runs[0].info.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["spooled"] == "true"
    curve = pd.read_csv(work / "plots" / "pretrain_loss.csv")
    assert curve["step"].iloc[-1] == train["max_steps"]
    for key in ("train_loss", "lr", "grad_norm"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == curve["step"].tolist(), f"every logged step of {key}, once"
    final = json.loads((work / "metrics" / "pretrain.json").read_text())
    for key in final.keys() - set(curve.columns):  # a key the curve shares shows its last step's value
        assert run.data.metrics[key] == pytest.approx(final[key]), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pretrain.json", "pretrain_loss.csv"} <= artifacts, artifacts
    teacher = client.get_model_version_by_alias("outage", "pretrain")  # the stage's alias; roles are evaluate's
    assert teacher.run_id == run.info.run_id
    files = {a.path for a in client.list_logged_model_artifacts(teacher.source.removeprefix("models:/"))}
    assert "model.safetensors" in files, files


def flow_state(repo: Path, env: dict):
    """The final state of the pipeline flow on `repo`, against the services' Prefect server."""
    from flows.pipeline import pipeline

    with prefect_at(env["PREFECT_API_URL"]):
        return pipeline(repo=str(repo), return_state=True)


def flow(repo: Path, env: dict) -> dict[str, str]:
    """Each stage's status after the pipeline flow on `repo`."""
    state = flow_state(repo, env)
    assert state.is_completed(), state
    return state.result()


@contextlib.contextmanager
def signatures_checked(endpoint: str):
    """The S3 server checks each request's signature against its IAM keys, as S3 does, for the block (moto's IAM
    auth; the services leave it off, as moto cannot check presigned URLs)."""

    def auth_after(requests: str) -> None:
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", requests.encode(), method="POST")
        request.add_header("Content-Type", "text/plain")  # moto reads the count from the raw body
        urllib.request.urlopen(request, timeout=10).close()

    auth_after("0")
    try:
        yield
    finally:
        auth_after("inf")


@pytest.mark.parametrize(
    ("bucket", "secret", "reason"),
    [
        ("no-such-bucket", None, "cannot read it: The specified bucket does not exist"),
        ("dvc", "not-the-key", "access denied, check its credentials: Forbidden"),
    ],
    ids=["wrong-url", "bad-credentials"],
)
def test_a_wrong_dvc_remote_stops_the_flow_in_one_line_before_any_stage_work(
    repo, on_services, tmp_path, monkeypatch, bucket, secret, reason
):
    env = repo[1] | on_services
    work = tmp_path / "work"
    shutil.copytree(repo[0], work, symlinks=True)
    sh("dvc", "remote", "add", "-d", "team", f"s3://{bucket}/dvc", cwd=work, env=env)
    if secret:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    fingerprint = work / load_params(work / "params.yaml").paths.sources_fingerprint
    before = fingerprint.stat().st_mtime_ns
    with signatures_checked(on_services["AWS_ENDPOINT_URL"]):
        state = flow_state(work, on_services)
    assert state.is_failed()
    with pytest.raises(RuntimeError) as failed:
        state.result()
    message = str(failed.value)
    assert message == f"DVC remote 'team' (s3://{bucket}/dvc): {reason}", message
    assert secret is None or secret not in message
    assert fingerprint.stat().st_mtime_ns == before, "not even the stage that always runs ran"


def shared(repo: Path, work: Path, env: dict) -> Path:
    """A copy of the pipeline fixture's repo as a teammate leaves it: the shared DVC remote in .dvc/config, the
    commit pushed to a git remote `origin` (a bare repo beside it) and the results to the DVC remote."""
    first = work / "first"
    shutil.copytree(repo, first, symlinks=True)
    sh("dvc", "remote", "add", "-d", "team", f"{env['LLM_PIPELINE_DVC_REMOTE']}/{work.name}", cwd=first, env=env)
    sh("git", "add", "-A", cwd=first, env=env)
    sh("git", "commit", "-qm", "pipeline run, shared remote", cwd=first, env=env)
    sh("git", "init", "-q", "--bare", "-b", "main", str(work / "origin.git"), cwd=work, env=env)
    sh("git", "remote", "add", "origin", str(work / "origin.git"), cwd=first, env=env)
    sh("git", "push", "-q", "origin", "HEAD:main", cwd=first, env=env)
    sh("dvc", "push", "--run-cache", cwd=first, env=env)
    return first


def test_a_worker_in_an_empty_folder_runs_the_work_pool_deployment(repo, on_services, tmp_path):
    """`prefect deploy` with the project's prefect.yaml against the PostgreSQL-backed server: a worker in an
    empty folder clones the deployed commit, pulls the data from the DVC remote, and has nothing to recompute."""
    env = repo[1] | on_services
    first = shared(repo[0], tmp_path, env)
    api = env["PREFECT_API_URL"]
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    assert declared["schedules"][0]["cron"] == load_params(ROOT / "params.yaml").run.schedule_cron
    prefect_cli("work-pool", "create", "llm-pipeline", "--type", "process", cwd=first, env=env)
    prefect_cli("deploy", "--all", cwd=first, env=env)
    deployment = httpx.get(f"{api}/deployments/name/pipeline/work-pool", timeout=30).json()
    assert deployment["work_pool_name"] == "llm-pipeline" and deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert deployment["schedules"][0]["schedule"]["cron"] == declared["schedules"][0]["cron"]
    clone = deployment["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    commit = sh("git", "rev-parse", "HEAD", cwd=first, env=env).strip()
    assert clone == {"id": "clone", "repository": str(tmp_path / "origin.git"), "commit_sha": commit}
    prefect_cli("deployment", "run", "pipeline/work-pool", cwd=first, env=env)
    worker = tmp_path / "worker"
    worker.mkdir()
    prefect_cli("worker", "start", "--pool", "llm-pipeline", "--run-once", cwd=worker, env=env)
    assert finished_runs(api, "work-pool"), "the worker ran the deployment's flow run to completion"
    assert not list(worker.iterdir()), "each flow run works in a folder of its own"
    report = latest_artifact(api, "pipeline-report")["data"]
    lock_hash = hashlib.sha256((first / "dvc.lock").read_bytes()).hexdigest()
    assert f"dvc.lock sha256: `{lock_hash}`" in report, "the deployed commit's pipeline"
    rows = [[cell.strip() for cell in line.split("|")] for line in report.splitlines() if line.startswith("| ")]
    assert [row[1] for row in rows if row[2] == "ran" and row[1] != "stage"] == ["sources"], report


def test_a_second_machine_restores_what_the_first_computed(repo, on_services, tmp_path):
    env = repo[1] | on_services
    first = shared(repo[0], tmp_path, env)
    # a params change (one no other test makes) the first machine's flow ran and pushed, each stage as soon as it
    # ran, but did not commit
    params = (first / "params.yaml").read_text()
    variant = yaml.safe_dump(merge(yaml.safe_load(params), {"evaluate": {"sample_tokens": 5}}), sort_keys=False)
    (first / "params.yaml").write_text(variant)
    assert flow(first, on_services)["evaluate"] == "ran"
    variant_metrics = (first / "metrics" / "evaluate.json").read_text()

    second = tmp_path / "second"
    sh("git", "clone", "-q", str(first), str(second), cwd=tmp_path, env=env)
    sh("dvc", "pull", "--run-cache", cwd=second, env=env)
    log = sh("dvc", "repro", cwd=second, env=env)
    ran = [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
    assert ran == ["sources"], "after dvc pull, a second machine reruns nothing"

    (second / "params.yaml").write_text(variant)
    statuses = flow(second, on_services)
    assert statuses["evaluate"] == "restored" and [s for s, r in statuses.items() if r == "ran"] == ["sources"]
    api = on_services["PREFECT_API_URL"]
    logs, page = [], True
    while page:  # every log line of every flow run on the server so far, 200 at a time (the server's page size)
        page = httpx.post(f"{api}/logs/filter", json={"limit": 200, "offset": len(logs)}, timeout=30).json()
        logs += page
    report = latest_artifact(api, "pipeline-report")["data"]
    outputs = files_under(*(repo / folder for repo in (first, second) for folder in ("reports", "metrics", "plots")))
    assert_no_secrets(on_services, [json.dumps(logs), report, *outputs], "flow logs, reports or metrics")
    assert (second / "metrics" / "evaluate.json").read_text() == variant_metrics
    status = subprocess.run(["dvc", "status", "--json"], cwd=second, env=env, capture_output=True, text=True)
    assert set(json.loads(status.stdout)) == {"sources"}, "only the stage that always runs"


def test_a_run_killed_on_one_machine_resumes_on_another_from_checkpoints_on_s3(pipeline, on_services, tmp_path):
    from lm import checkpoints

    p, _ = pipeline
    every, steps = 30, 300
    ckpt = f"{on_services['LLM_PIPELINE_DATA_BUCKET']}/{tmp_path.name}/checkpoints"
    train = {"max_steps": steps, "checkpoint_every": every, "keep_checkpoints": 2}
    overrides = {"paths": {"checkpoints": ckpt}, "pretrain": {"train": train}}
    machines = [tiny_repo(tmp_path / f"machine{i}", p.paths.tokens, overrides) for i in (1, 2)]
    env = os.environ | on_services | {"PYTHONPATH": str(ROOT)}

    def pretrain(machine: Path) -> subprocess.Popen:
        store = {"MLFLOW_TRACKING_URI": f"sqlite:///{machine / 'mlflow.db'}"}
        return subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain"],
            cwd=machine,
            env=env | store,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = pretrain(machines[0])
    deadline = time.monotonic() + 240
    while not [step for step, _ in checkpoints.checkpoints(f"{ckpt}/pretrain") if step >= 2 * every]:
        assert first.poll() is None, f"run ended before it could be killed:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared on S3"
        time.sleep(1)
    first.kill()
    first.wait()
    assert not (machines[0] / "models").exists(), "killed before it finished"

    second = pretrain(machines[1])
    log = second.communicate(timeout=300)[0]
    assert second.returncode == 0, log[-3000:]
    assert f"resuming from {ckpt}/pretrain/step=" in log
    resumed_from = json.loads((machines[1] / "metrics" / "pretrain.json").read_text())["resumed_from_step"]
    assert 2 * every <= resumed_from < steps and resumed_from % every == 0
    assert [step for step, _ in checkpoints.checkpoints(f"{ckpt}/pretrain")] == [steps - every, steps]
    assert model_dir.load(machines[1] / "models" / "pretrain").config.n_layer == TINY["pretrain"]["model"]["n_layer"]
