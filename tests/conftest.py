import contextlib
import dataclasses
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from stages import cost, registry
from stages.config import Params, merge, parse_params
from stages.tracking import NO_TRACKING
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
# The tiny model and runs, on the real default corpus; with several ingest shards and checkpoints during
# training, so that the kill tests (test_chaos.py) have points to kill at.
TINY_OVERRIDES = merge(
    {k: TINY[k] for k in ("pretrain", "distill", "prune", "quantize", "evaluate")},
    {"pretrain": {"train": {"checkpoint_every": 10}}, "distill": {"train": {"checkpoint_every": 4}}},
) | {"tokenize": {"vocab_size": 512}, "ingest": {"shard_rows": 200}}

WORDS = (
    "data model train token layer loss weight value batch step learn curve text corpus byte merge "
    "python function return class import module test sample filter clean split shard write read"
).split()


def write_corpus(root: Path, n_docs: int = 80, seed: int = 0) -> Path:
    """Seeded prose-like documents, plus one exact duplicate (modulo whitespace), one short and one non-text doc."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            " ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(rng.randint(8, 20))
        ]
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "dup.txt").write_text("  " + (root / "doc000.txt").read_text().replace(" ", "   "))
    (root / "short.txt").write_text("Too short to keep.\n")
    (root / "numbers.txt").write_text(
        "\n".join(" ".join(str(rng.randint(0, 9999)) for _ in range(20)) for _ in range(10))
    )
    return root


def tiny_params(tmp: Path) -> Params:
    corpus = write_corpus(tmp / "corpus")
    data = {k: dict(v) for k, v in TINY.items()}
    data["ingest"] = {**TINY["ingest"], "sources": [{**TINY["ingest"]["sources"][0], "path": str(corpus)}]}
    params = parse_params(data)
    return dataclasses.replace(params, paths=rooted(params.paths, tmp))


def rooted(paths, root: Path):
    """paths with every path under root."""
    return dataclasses.replace(paths, **{f.name: str(root / getattr(paths, f.name)) for f in dataclasses.fields(paths)})


def models_beside(p: Params, folder: Path, *linked: str) -> str:
    """A models folder for a stage run apart from the pipeline's: it writes its own model there, beside links to
    the pipeline's `linked` models (its source or teacher)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in linked:
        (folder / stage).symlink_to(Path(p.paths.model(stage)).resolve())
    return str(folder)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> tuple[Params, dict]:
    """Every stage's run() once, in dvc.yaml's order, on the tiny corpus; returns the params and each stage's
    metrics (as its metrics file holds them)."""
    p = tiny_params(tmp_path_factory.mktemp("pipeline"))
    return p, {name: cost.without_phases(run(p, NO_TRACKING)) for name, run in registry().items()}


@pytest.fixture(scope="session")
def prefect_server():
    """One real local Prefect server (with its scheduler) for the session; yields the env that points at it."""
    from flows.server import local_server

    with local_server(scheduler_loop_s=2) as env:
        yield env


@contextlib.contextmanager
def prefect_at(api_url: str):
    """This process's Prefect client pointed at the server of api_url. Prefect's services that acquire
    concurrency slots keep one client per process, made on first use: they are restarted on both sides, as the
    suite talks to more than one server."""
    from prefect.concurrency.services import (
        ConcurrencySlotAcquisitionService,
        ConcurrencySlotAcquisitionWithLeaseService,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def restart_services():
        for service in (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService):
            service.drain_all()

    restart_services()
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        restart_services()


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """This process's Prefect client pointed at the session's server."""
    for key, value in prefect_server.items():
        monkeypatch.setenv(key, value)
    with prefect_at(prefect_server["PREFECT_API_URL"]) as url:
        yield url


def latest_artifact(api: str, key: str) -> dict:
    """The newest artifact with this key, from the Prefect REST API (Prefect 3.8.8's Artifact.get sends null
    filters that its own server rejects)."""
    response = httpx.get(f"{api}/artifacts/{key}/latest", timeout=30)
    response.raise_for_status()
    return response.json()


def finished_runs(api: str, deployment: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [deployment]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def prefect_cli(*args, cwd, env) -> str:
    return sh(sys.executable, "-m", "prefect", "--no-prompt", *args, cwd=cwd, env=env)


def sh(*cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A copy of the project's tracked files as a fresh git repo, with tiny params, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file() and not rel.startswith(("data/", "models/", "metrics/", "plots/", "reports/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY_OVERRIDES), sort_keys=False))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@example.com",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@example.com",
    }
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "copy", cwd=repo, env=env)
    first = sh("dvc", "repro", cwd=repo, env=env)
    return repo, env, first
