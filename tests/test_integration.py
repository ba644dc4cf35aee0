"""The real tools end to end: a temporary git + DVC repo running `dvc repro`, MLflow, and the Prefect flow."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from stages import io
from stages.config import load_params, merge
from stages.evaluate import COLUMNS
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "curate", "tokenize", "pretrain", "distill", "scratch", "prune", "quantize", "evaluate"]
# The tiny model and runs, on the real default corpus.
TINY_OVERRIDES = {k: TINY[k] for k in ("pretrain", "distill", "evaluate")} | {"tokenize": {"vocab_size": 512}}


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


def test_dvc_repro_runs_every_stage_and_writes_checked_outputs(repo):
    repo, env, log = repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    p = load_params(repo / "params.yaml")
    assert len(io.read_shards(repo / p.paths.raw, io.RAW_DOCS)) > 300
    for split in ("train", "val"):
        io.read_shards(repo / p.paths.curated / split, io.CURATED_DOCS)
    assert io.read_json(repo / p.paths.tokens / "meta.json")["vocab_size"] <= 512
    evaluate = io.read_json(repo / p.paths.metrics / "evaluate.json")
    assert list(evaluate) == list(p.models())
    for row in evaluate.values():
        assert set(row) == set(COLUMNS)
    assert "| pretrain |" in log, "evaluate prints the table"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES


def test_mlflow_holds_a_tagged_run_per_stage(repo):
    repo, env, _ = repo
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["llm-pipeline"], output_format="list")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == set(STAGES)
    commit = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).strip()
    assert all(r.info.status == "FINISHED" and r.data.tags["git_commit"] == commit for r in runs)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    tokens_md5 = next(o["md5"] for o in lock["stages"]["tokenize"]["outs"])
    assert by_stage["pretrain"].data.tags["dvc.input.data/tokens"] == tokens_md5
    assert "pretrain.train.max_steps" in by_stage["pretrain"].data.params
    assert by_stage["evaluate"].data.metrics["quantize_int4_gptq.file_bytes"] > 0
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id)}
    assert logged == {"pretrain.json", "pretrain_loss.csv", "README.md", "config.json", "model"}
    for alias in ("pretrain", "distill", "scratch"):
        version = client.get_model_version_by_alias("llm-pipeline", alias)
        assert version.run_id == by_stage[alias].info.run_id and version.tags["git_commit"] == commit
    step_losses = client.get_metric_history(by_stage["pretrain"].info.run_id, "train_loss")
    assert [m.step for m in step_losses] == [5, 10, 15, 20, 25, 30]


def test_second_repro_runs_nothing(repo):
    repo, env, _ = repo
    lock_before = (repo / "dvc.lock").read_text()
    t0 = time.perf_counter()
    log = sh("dvc", "repro", cwd=repo, env=env)
    elapsed = time.perf_counter() - t0
    assert "Running stage" not in log and (repo / "dvc.lock").read_text() == lock_before
    assert elapsed < 15, f"no-op dvc repro took {elapsed:.1f}s"


def test_bad_params_fail_before_any_work(repo, tmp_path):
    repo, env, _ = repo
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad, ignore=shutil.ignore_patterns("data", "models", ".dvc"))
    (bad / "params.yaml").write_text((bad / "params.yaml").read_text().replace("sparsity: 0.5", "sparsity: 5"))
    proc = subprocess.run([sys.executable, "-m", "stages.prune"], cwd=bad, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "prune.sparsity must be in [0.0, 1.0), got 5.0" in proc.stderr and "Traceback" not in proc.stderr


def latest_artifact(key: str) -> dict:
    """The newest artifact with this key, from the Prefect REST API (Prefect 3.8.8's Artifact.get sends null
    filters that its own server rejects)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.get(f"{PREFECT_API_URL.value()}/artifacts/{key}/latest", timeout=30)
    response.raise_for_status()
    return response.json()


def test_prefect_flow_reruns_only_what_changed(repo, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline, stage_graph

    repo, env, _ = repo
    graph = stage_graph(repo)
    order = list(graph)
    assert sorted(order) == sorted(STAGES) and graph["scratch"] == ["tokenize"]
    for before, after in [*zip(STAGES[:4], STAGES[1:5], strict=True), ("tokenize", "scratch"), ("scratch", "prune")]:
        assert order.index(before) < order.index(after), (before, after)
    assert order[-3:] == ["prune", "quantize", "evaluate"]
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    params = (repo / "params.yaml").read_text()
    for key in ("PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    with prefect_test_harness(server_startup_timeout=60):
        # a stage that fails fails the flow with its own message; the stages before it stay done
        assert "\n  m: 4\n" in params
        (repo / "params.yaml").write_text(params.replace("\n  m: 4\n", "\n  m: 3\n"))
        failed = pipeline(repo=str(repo), return_state=True)
        assert failed.is_failed()
        with pytest.raises(RuntimeError, match=r"stage prune failed \(exit 1\): .*prune.m=3 does not divide"):
            failed.result()
        # fixed, with a prune change: the rerun resumes, running exactly prune and what follows it
        (repo / "params.yaml").write_text(params.replace("sparsity: 0.5", "sparsity: 0.25"))
        state = pipeline(repo=str(repo), return_state=True)
        assert state.is_completed(), state
        ran = state.result()
        assert list(ran) == order and [s for s in order if ran[s]] == ["prune", "quantize", "evaluate"]
        report = latest_artifact("pipeline-report")
        assert "| quantize_int4_gptq |" in report["data"] and "dvc.lock sha256" in report["data"]
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("ingest", "curate", "tokenize", "pretrain", "distill", "scratch"):
        assert lock_after[stage] == lock_before[stage], f"{stage} should not rerun"
    for stage in ("prune", "quantize", "evaluate"):
        assert lock_after[stage] != lock_before[stage], f"{stage} should rerun"
    assert io.read_json(repo / "metrics" / "prune.json")["wanda"]["sparsity"] == pytest.approx(0.25, abs=0.01)
    # MLflow: one parent run per flow run; the stages that ran nest under it, the skipped ones are marked cached
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    [parent, _] = mlflow.search_runs(
        experiment_names=["llm-pipeline"], filter_string="tags.stage = 'pipeline'", output_format="list"
    )
    children = mlflow.search_runs(
        experiment_names=["llm-pipeline"],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == set(STAGES)
    assert by_stage["pretrain"].data.tags["cached"] == "true" and by_stage["pretrain"].data.tags["made_by"]
    assert "cached" not in by_stage["prune"].data.tags and by_stage["prune"].info.status == "FINISHED"
    assert "| prune | ran |" in report["data"]


def test_deployment_serves_the_flow_on_the_params_cron():
    from flows.deploy import deployment

    dep = deployment(ROOT)
    assert dep.name == "scheduled" and dep.parameters == {"repo": str(ROOT)}
    assert dep.schedules[0].schedule.cron == load_params(ROOT / "params.yaml").run.schedule_cron
