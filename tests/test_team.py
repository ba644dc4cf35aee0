"""A team's set-up on real services started here on 127.0.0.1 (flows/services.py): PostgreSQL, an S3 server
(moto), the MLflow server (PostgreSQL, artifacts on S3) and the Prefect server (PostgreSQL). A second machine
restores what the first computed, artifacts live on the server's store, and ingest reads every format from S3."""

import gzip
import io as stdio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import fsspec
import mlflow
import pandas as pd
import pytest
import yaml
import zstandard
from conftest import ROOT, sh

from flows.services import BUCKETS, running
from lm import model_dir
from stages import ingest
from stages.config import IngestConfig, Params, Paths, Source, merge
from stages.tracking import NO_TRACKING
from tiny import TINY

DOCS = ["First document, from S3.", "Second one: caf\u00e9.", "Third\twith a tab."]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running(tmp_path_factory.mktemp("services")) as env:
        yield env


@pytest.fixture
def on_services(services, monkeypatch):
    """This process pointed at the services, as an exported environment would."""
    for key, value in services.items():
        monkeypatch.setenv(key, value)
    return services


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
        metrics = ingest.run(Params(ingest=cfg, paths=Paths(raw=str(tmp_path / name))), NO_TRACKING)
        assert metrics["documents"] == (1 if name.endswith(".txt") else 3), name


def tiny_repo(root: Path, tokens: str) -> Path:
    """A folder where a stage runs as DVC runs it: dvc.yaml, and tiny params over the pipeline fixture's tokens."""
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root)
    params = {"paths": {"tokens": tokens}, "pretrain": TINY["pretrain"]}
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
    assert any(k.endswith("model/pretrain/model.safetensors") for k in keys)
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
        "print(mlflow.artifacts.download_artifacts('models:/llm-pipeline@teacher', dst_path=sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", download, str(elsewhere / "teacher")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    model = model_dir.load(proc.stdout.strip().splitlines()[-1])
    assert model.config == model_dir.load(work / "models" / "pretrain").config


def flow(repo: Path, env: dict) -> dict[str, str]:
    """The pipeline flow on `repo`, against the services' Prefect server; each stage's status."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        state = pipeline(repo=str(repo), return_state=True)
    assert state.is_completed(), state
    return state.result()


def test_a_second_machine_restores_what_the_first_computed(repo, on_services, tmp_path):
    first_repo, env, _ = repo
    env = env | on_services
    first = tmp_path / "first"
    shutil.copytree(first_repo, first, symlinks=True)
    remote = f"{on_services['LLM_PIPELINE_DVC_REMOTE']}/{tmp_path.name}"
    sh("dvc", "remote", "add", "-d", "team", remote, cwd=first, env=env)
    sh("git", "add", "-A", cwd=first, env=env)
    sh("git", "commit", "-qm", "pipeline run, shared remote", cwd=first, env=env)
    sh("dvc", "push", "--run-cache", cwd=first, env=env)
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
    assert (second / "metrics" / "evaluate.json").read_text() == variant_metrics
    status = subprocess.run(["dvc", "status", "--json"], cwd=second, env=env, capture_output=True, text=True)
    assert set(json.loads(status.stdout)) == {"sources"}, "only the stage that always runs"
