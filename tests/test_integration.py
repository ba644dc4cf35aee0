"""The real tools end to end: a temporary git + DVC repo running `dvc repro`, MLflow, and the Prefect flow."""

import concurrent.futures
import contextlib
import contextvars
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from conftest import finished_runs, latest_artifact, sh

from flows.server import free_port
from lm import io, tables
from stages.config import load_params, merge
from stages.dvcfile import stage_names
from stages.evaluate import COLUMNS
from stages.tracking import dvc_input_hashes, views

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("teacher", "student", "int8", "int4")  # registry aliases of the four model variants
STAGES = stage_names(ROOT)
TRACKED = STAGES[1:]  # the stages with an MLflow run: sources only lists files, at every repro


def test_dvc_repro_runs_every_stage_and_writes_checked_outputs(repo):
    repo, env, log = repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    p = load_params(repo / "params.yaml")
    assert len(tables.read_shards(repo / p.paths.raw, tables.RAW_DOCS)) > 300
    for split in ("train", "val"):
        tables.read_shards(repo / p.paths.curated / split, tables.CURATED_DOCS)
    assert io.read_json(repo / p.paths.tokens / "meta.json")["vocab_size"] <= 512
    evaluate = io.read_json(repo / p.paths.metrics / "evaluate.json")
    assert list(evaluate) == list(p.models())
    for name, row in evaluate.items():
        deltas = {"val_loss_delta", "val_loss_delta_ci95"} if name in p.made_from() else set()
        assert set(row) == set(COLUMNS) | deltas
    compared = io.read_json(repo / p.paths.metrics / "compare.json")
    assert list(compared) == [f"{a}_vs_{b}" for a, b in p.evaluate.compare]
    assert "| pretrain |" in log, "evaluate prints the table"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    ledger = io.read_json(repo / p.paths.metrics / "ledger.json")
    assert list(ledger["stages"]) == STAGES and all(e["ran"] for e in ledger["stages"].values())
    assert ledger["this_run"]["stages_ran"] == len(STAGES) and ledger["this_run"]["peak_rss_mb"] > 100
    assert 0 < ledger["stages"]["pretrain"]["mfu"] < 1.5 and ledger["stages"]["pretrain"]["train_flops"] > 0
    assert "| pretrain | yes |" in (repo / p.paths.reports / "ledger.md").read_text()


def test_mlflow_holds_a_tagged_run_per_stage(repo):
    repo, env, _ = repo
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["llm-pipeline"], output_format="list")
    by_stage = {r.data.tags["stage"]: r for r in runs if "stage" in r.data.tags}
    assert set(by_stage) == set(TRACKED)
    commit = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).strip()
    assert all(r.info.status == "FINISHED" and r.data.tags["git_commit"] == commit for r in runs)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    tokens_md5 = next(o["md5"] for o in lock["stages"]["tokenize"]["outs"])
    assert by_stage["pretrain"].data.tags["dvc.input.data/tokens"] == tokens_md5
    datasets = {d.dataset.name: d.dataset for d in by_stage["pretrain"].inputs.dataset_inputs}
    assert datasets["data/tokens"].digest == tokens_md5.removesuffix(".dir"), "the UI's Datasets column"
    assert {"pretrain.train.max_steps", "train.lr", "run.seed"} <= set(by_stage["pretrain"].data.params)
    assert not [key for key in by_stage["pretrain"].data.params if key.startswith(("distill.", "run.experiment"))]
    assert by_stage["evaluate"].data.metrics["quantize_int4_gptq.file_bytes"] > 0
    assert all(r.data.metrics["cost.wall_s"] > 0 and "cost.peak_rss_mb" in r.data.metrics for r in by_stage.values())
    assert by_stage["pretrain"].data.metrics["cost.mfu"] > 0
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id)}
    assert logged == {"pretrain.json", "pretrain_loss.csv", "pretrain_val.csv", "pretrain_windows.parquet"} | {
        "README.md", "config.json", "tokenizer.json"}  # fmt: skip
    made_by = {"teacher": "pretrain", "student": "distill", "scratch": "scratch", "prune_wanda": "prune"}
    made_by |= {"int8": "quantize", "int4": "quantize", "quantize_int4_rtn": "quantize"}
    for alias, stage in made_by.items():
        version = client.get_model_version_by_alias("llm-pipeline", alias)
        assert version.run_id == by_stage[stage].info.run_id and version.tags["git_commit"] == commit
    assert all(r.inputs.dataset_inputs for r in by_stage.values()), "every stage run's Datasets column"
    step_losses = client.get_metric_history(by_stage["pretrain"].info.run_id, "train_loss")
    assert [m.step for m in step_losses] == [5, 10, 15, 20, 25, 30]
    p = load_params(repo / "params.yaml")
    prune_run = f"tags.mlflow.parentRunId = '{by_stage['prune'].info.run_id}'"
    recovered = {r.info.run_name: r for r in client.search_runs([by_stage["prune"].info.experiment_id], prune_run)}
    assert set(recovered) == {f"prune_{m}" for m in p.prune.recover}, "each recovery's curve, a child run"
    recovery = p.prune.recovery
    steps = list(range(recovery.log_every, recovery.max_steps + 1, recovery.log_every))
    assert [m.step for m in client.get_metric_history(recovered["prune_nm"].info.run_id, "train_loss")] == steps


def test_evaluate_logs_one_comparable_row_per_model_linked_to_the_model_its_stage_logged(repo):
    """What the MLflow compare view and the registry show: a child run of evaluate's run per model, every one with
    the same metric names and the model's tags, its metrics also those of the logged model its stage made, which
    the model's registered version points at."""
    repo, env, _ = repo
    p = load_params(repo / "params.yaml")
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llm-pipeline").experiment_id
    [evaluate] = client.search_runs([experiment], "tags.stage = 'evaluate'")
    rows = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{evaluate.info.run_id}'")
    assert sorted(r.info.run_name for r in rows) == sorted(p.models()) and len(rows) == 12
    tokens_md5 = dvc_input_hashes([p.paths.tokens], repo / "dvc.lock")[p.paths.tokens].removesuffix(".dir")
    metrics = set(COLUMNS) | {"val_loss_delta", "val_loss_delta_ci95"}
    for row in rows:
        name = row.info.run_name
        assert set(row.data.metrics) == (metrics if name in p.made_from() else set(COLUMNS)), name
        assert p.model_tags(name).items() <= row.data.tags.items()
        assert [(d.dataset.name, d.dataset.digest) for d in row.inputs.dataset_inputs] == [("data/tokens", tokens_md5)]
        version = client.get_model_version_by_alias("llm-pipeline", name)
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.name == name and logged.source_run_id == version.run_id
        linked = {m.key: (m.value, m.run_id, m.dataset_name) for m in logged.metrics}
        assert linked["val_loss"] == (row.data.metrics["val_loss"], row.info.run_id, "data/tokens"), name


def test_second_repro_runs_nothing(repo):
    repo, env, _ = repo
    lock_before = (repo / "dvc.lock").read_text()
    t0 = time.perf_counter()
    log = sh("dvc", "repro", cwd=repo, env=env)
    elapsed = time.perf_counter() - t0
    ran = [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
    assert ran == ["sources"], "only the source listing, which finds nothing new"
    assert (repo / "dvc.lock").read_text() == lock_before
    ledger = io.read_json(repo / "metrics" / "ledger.json")
    assert [s for s, e in ledger["stages"].items() if e["ran"]] == ["sources"], "the rest were kept"
    assert ledger["from_scratch"]["wall_s"] > 10 * ledger["this_run"]["wall_s"]
    assert elapsed < 15, f"no-op dvc repro took {elapsed:.1f}s"


def test_a_second_dvc_repro_on_a_busy_workspace_fails_fast_and_corrupts_nothing(repo, tmp_path):
    """Two `dvc repro` at once on one workspace: the second stops while the first still runs, with DVC's message
    naming the busy path and the command that holds it; the first completes, and the workspace is as one run
    leaves it."""
    repo, env, _ = repo
    work = tmp_path / "work"
    shutil.copytree(repo, work, symlinks=True)
    lock_before = (work / "dvc.lock").read_text()
    first = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", "curate"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert b"Running stage 'curate'" in first.stdout.readline(), "the first holds the workspace"
    t0 = time.perf_counter()
    second = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    waited = time.perf_counter() - t0
    # DVC locks each stage's paths while it runs, and names who holds them
    assert second.returncode != 0 and "is busy, it is being blocked by" in second.stderr, second.stderr
    assert "dvc repro -f -s curate" in second.stderr, second.stderr
    assert first.poll() is None, f"the second stopped ({waited:.0f} s) while the first was still running"
    assert first.wait(timeout=600) == 0, first.stdout.read()
    assert stale(work, env) == set() and (work / "dvc.lock").read_text() == lock_before, "as one run leaves it"


def stale(repo: Path, env: dict) -> set[str]:
    """The stages `dvc status` finds changed (sources, which lists files every time, aside)."""
    proc = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(proc.stdout)) - {"sources"}


def training_configs(params_yaml: Path) -> dict:
    """Each training stage's effective training config (and shape)."""
    p = load_params(params_yaml)
    return {
        "pretrain": (p.pretrain, p.run.seed),
        "distill": (p.distill, p.run.seed),
        "scratch": (p.distill.student, p.distill.train, p.run.seed),
        "prune": (p.prune, p.run.seed),
    }


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"file": "stages/pretrain.py"}, {"pretrain"}),
        ({"file": "lm/train.py"}, {"pretrain", "distill", "scratch", "prune"}),
        ({"file": "lm/distill.py"}, {"distill"}),
        ({"file": "lm/prune.py"}, {"prune"}),
        ({"file": "lm/quant.py"}, {"quantize"}),
        ({"params": {"pretrain": {"train": {"lr": 0.01}}}}, {"pretrain"}),
        ({"params": {"distill": {"train": {"lr": 0.01}}}}, {"distill", "scratch"}),
        ({"params": {"prune": {"recovery": {"lr": 0.01}}}}, {"prune"}),
        ({"params": {"train": {"weight_decay": 0.05}}}, {"pretrain", "distill", "scratch", "prune"}),
    ],
)
def test_an_edit_reruns_exactly_the_stages_it_affects(repo, edit, expected):
    """Code deps follow the imports, and the training blocks share the `train:` defaults without rerunning a stage
    whose effective values did not change."""
    repo, env, _ = repo
    path = repo / edit.get("file", "params.yaml")
    before = path.read_text()
    configs = training_configs(repo / "params.yaml")
    try:
        if "file" in edit:
            path.write_text(before + "\n# an edit\n")
        else:
            path.write_text(yaml.safe_dump(merge(yaml.safe_load(before), edit["params"]), sort_keys=False))
            changed = training_configs(path)
            assert {stage for stage in configs if configs[stage] != changed[stage]} == expected
        assert stale(repo, env) == expected
    finally:
        path.write_text(before)
    assert stale(repo, env) == set()


def test_bad_params_fail_before_any_work(repo, tmp_path):
    repo, env, _ = repo
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad, ignore=shutil.ignore_patterns("data", "models", ".dvc"))
    (bad / "params.yaml").write_text((bad / "params.yaml").read_text().replace("sparsity: 0.5", "sparsity: 5"))
    proc = subprocess.run([sys.executable, "-m", "stages.prune"], cwd=bad, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "prune.sparsity must be in [0.0, 1.0), got 5.0" in proc.stderr and "Traceback" not in proc.stderr


def test_prefect_flow_reruns_only_what_changed(repo, prefect_api, monkeypatch):
    from flows.pipeline import pipeline, stage_graph

    repo, env, _ = repo
    graph = stage_graph(repo)
    order = list(graph)
    assert sorted(order) == sorted(STAGES) and graph["scratch"] == ["tokenize"]
    assert sorted(graph["prune"]) == ["distill", "tokenize"], "prune waits on its prune.source model alone"
    for before, after in [*zip(STAGES[:4], STAGES[1:5], strict=True), ("tokenize", "scratch")]:
        assert order.index(before) < order.index(after), (before, after)
    assert order[-3:] == ["prune", "quantize", "evaluate"]
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    params = (repo / "params.yaml").read_text()
    for key in ("PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
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
    assert list(ran) == order and [s for s in order if ran[s] == "ran"] == ["sources", "prune", "quantize", "evaluate"]
    report = latest_artifact(prefect_api, "pipeline-report")
    assert "| quantize_int4_gptq |" in report["data"] and "dvc.lock sha256" in report["data"]
    assert "What each stage cost" in report["data"] and "| prune | yes |" in report["data"]
    assert "| pretrain | cached |" in report["data"]
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
    assert set(by_stage) == set(TRACKED)
    ran_cost = sum(io.read_json(repo / "metrics" / "cost" / f"{s}.json")["wall_s"] for s in ("sources", "prune"))
    assert parent.data.metrics["cost.stages_ran"] == 4 and parent.data.metrics["cost.wall_s"] > ran_cost
    pretrain_runs = mlflow.search_runs(
        experiment_names=["llm-pipeline"], filter_string="tags.stage = 'pretrain'", output_format="list"
    )
    [made] = [r.info.run_id for r in pretrain_runs if "cached" not in r.data.tags]
    assert by_stage["pretrain"].data.tags["cached"] == "true" and by_stage["pretrain"].data.tags["made_by"] == made
    assert "cached" not in by_stage["prune"].data.tags and by_stage["prune"].info.status == "FINISHED"
    assert "| prune | ran |" in report["data"]


def test_deployment_serves_the_flow_on_the_params_cron():
    from flows.deploy import deployment

    dep = deployment(ROOT)
    assert dep.name == "scheduled" and dep.parameters == {"repo": str(ROOT)}
    assert dep.concurrency_options.collision_strategy.value == "CANCEL_NEW" and dep.concurrency_limit == 1
    assert dep.schedules[0].schedule.cron == load_params(ROOT / "params.yaml").run.schedule_cron


def test_scheduled_deployment_fires_and_reruns_what_changed(repo, prefect_server):
    """`python -m flows.deploy` serving on a 3 s interval against a real server: its scheduler makes a run, the
    serving process runs it, and DVC reruns exactly the stage whose input changed since the last run."""
    repo, env, _ = repo
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changed = merge(params, {"run": {"schedule_cron": "", "schedule_interval_s": 3}, "evaluate": {"sample_tokens": 8}})
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    serving_env = env | prefect_server | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = repo / "serve.log"
    with log.open("w") as out:
        serving = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy"], cwd=repo, env=serving_env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 240
            while not (done := finished_runs(prefect_server["PREFECT_API_URL"], "scheduled")):
                assert serving.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        finally:
            serving.terminate()
            # Prefect's graceful shutdown lets a run it has begun finish (the next interval's may have just
            # started): a slow machine needs more than a minute for that whole flow run
            serving.wait(timeout=300)
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert done[0]["auto_scheduled"], "made by the server's scheduler"
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert [s for s in STAGES if lock_after[s] != lock_before[s]] == ["evaluate"]


def test_sweep_runs_the_grid_as_dvc_experiments_and_compares_them(repo, prefect_api, monkeypatch):
    from flows.sweep import experiment_name, sweep

    repo, env, _ = repo
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the experiments find the repo's store through $DVC_ROOT
    params = (repo / "params.yaml").read_text()
    grid = {"pretrain.train.max_steps": [6, 12]}
    swept = yaml.safe_load(params) | {"sweep": {"grid": grid, "jobs": 2, "targets": ["pretrain"]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(swept, sort_keys=False))
    try:
        rows = sweep(repo=str(repo))
        again = sweep(repo=str(repo))  # on the same commit: nothing left to run, the same table
    finally:
        (repo / "params.yaml").write_text(params)
    names = {experiment_name({"pretrain.train.max_steps": steps}): steps for steps in grid["pretrain.train.max_steps"]}
    assert {r["experiment"]: r["pretrain.train.max_steps"] for r in rows} == names
    assert again == rows
    losses = [r["pretrain.val_loss"] for r in rows]
    assert all(loss > 0 for loss in losses) and losses[0] != losses[1], rows
    assert all(set(r) == {"experiment", "pretrain.train.max_steps", "pretrain.val_loss"} for r in rows), "targets only"
    shown = sh("dvc", "exp", "show", "--no-pager", "--csv", cwd=repo, env=env)
    assert all(name in shown for name in names)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    tagged = mlflow.search_runs(
        experiment_names=["llm-pipeline"], filter_string="tags.stage = 'pretrain'", output_format="list"
    )
    assert set(names) <= {r.data.tags.get("dvc_experiment") for r in tagged}, "runs in the repo's store, tagged"
    report = latest_artifact(prefect_api, "sweep-report")["data"]
    assert all(name in report for name in names) and "compare-runs?runs=" in report


def test_recipes_run_arms_as_shared_experiments_and_judge_them(repo, prefect_api, monkeypatch):
    """Three recipes on the tiny repo: an exact one (the same weights in two architectures), a noise floor that
    reuses its control's run, and an equivalence test that runs nothing new, widened by that floor."""
    from flows.recipe import recipe

    repo, env, _ = repo
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the experiments find the repo's store through $DVC_ROOT
    centered = {"pretrain.model.center_residual": True, "pretrain.train.max_steps": 8}
    arms = {"layer_norm": {}, "rms_norm": {"pretrain.model.norm": "rmsnorm"}}
    common = {"paper": "Pre-RMSNorm", "claim": "Pre-LN equals Pre-RMSNorm", "base": centered, "arms": arms}
    common |= {"control": "layer_norm", "targets": ["pretrain"], "model": "pretrain", "jobs": 2}
    recipes = {
        "same_weights": common | {"seeds": [1], "test": {"kind": "exact"}},
        "floor": common | {"arms": {"layer_norm": {}}, "seeds": [1, 2, 3], "test": {"kind": "noise_floor"}},
        "equal": common | {"seeds": [1], "test": {"kind": "equivalence", "margin": 0.05}, "noise_floor": "floor"},
    }
    for name, spec in recipes.items():
        (repo / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    exact = recipe("same_weights", repo=str(repo))
    [compared] = exact["comparisons"]
    assert exact["verdict"] == "REPRODUCED" and compared["max_logit_difference"] <= 1e-5
    assert abs(compared["delta"]) < 1e-4, "trained from the same seed, the two arms' losses agree too"
    floor = recipe("floor", repo=str(repo))
    assert floor["reused"] == 1 and floor["experiments"] == 3 and floor["seed_sd"] > 0
    equal = recipe("equal", repo=str(repo))
    assert equal["reused"] == equal["experiments"] == 2, "every run shared with the exact recipe"
    [compared] = equal["comparisons"]
    assert compared["noise_floor_sd"] == floor["seed_sd"] and equal["verdict"] in ("REPRODUCED", "INCONCLUSIVE")
    report = (repo / "reports" / "recipes" / "same_weights.md").read_text()
    assert "**Verdict: REPRODUCED**" in report and json.loads((repo / "metrics/recipes/floor.json").read_text())
    assert "Verdict: REPRODUCED" in latest_artifact(prefect_api, "recipe-same-weights")["data"]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llm-pipeline").experiment_id
    [parent] = client.search_runs([experiment], "attributes.run_name = 'recipe same_weights'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["layer_norm", "rms_norm"]
    assert parent.data.tags["verdict"] == "REPRODUCED" and "rms_norm.delta" in parent.data.metrics


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium in this sandbox: no GPU, no network beyond loopback (its background connections would be refused)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
CHROMIUM_ARGS += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def mlflow_ui(repo, tmp_path):
    """`mlflow server` on the repo's store, on 127.0.0.1; yields its URL."""
    repo, env, _ = repo
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", env["MLFLOW_TRACKING_URI"], "--workers", "1"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its job runners are children of its own: stopped with it, as a group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.ui
@pytest.mark.skipif(
    CHROMIUM is None or importlib.util.find_spec("playwright") is None,
    reason="no Chromium or playwright installed (make test-ui installs them)",
)
def test_mlflow_ui_compares_the_model_variants_side_by_side(repo, mlflow_ui, tmp_path, monkeypatch):
    """The real MLflow UI in headless Chromium, read by its text as a user reads it, at the links `python -m
    stages.tracking views` prints: the stage runs with their Datasets and Models columns filled, the registry's
    role aliases, the teacher, student, int8 and int4 rows compared metric by metric, and the training curves
    overlaid in the chart view."""
    from playwright import sync_api as playwright_api

    repo, env, _ = repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("MLFLOW_UI_URL", mlflow_ui)
    links = list(views("llm-pipeline", repo).values())
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    roles = {r.data.tags["role"]: r for r in client.search_runs([experiment_id(client)], "tags.role != '-'")}
    shots = Path(os.environ.get("UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})

        def show(url: str, *expected: str, screenshot: str, expand="", charts="", height=900, plot=False) -> str:
            """Open the page, wait for each expected text (the UI renders after its API calls), screenshot it.
            expand: the run whose child runs to unfold first; charts: the charts to search for, as a user types;
            height: of the window (the page scrolls inside it); plot: wait for a plot to be drawn too."""
            page.set_viewport_size({"width": 1500, "height": height})
            page.goto(url)
            # a chart may be below the fold (the page renders those in view): wait for the chart search box there
            ready = page.get_by_placeholder("Search metric charts") if charts else page.get_by_text(expected[0]).first
            ready.wait_for(timeout=60_000)
            assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if assistant.count():
                assistant.first.click()  # the side panel would cover the table
            if expand:
                run = page.get_by_text(expand, exact=True).first
                run.locator("xpath=ancestor::div[contains(@class,'ag-cell')][1]").locator("button").first.click()
            if charts:
                page.get_by_placeholder("Search metric charts").fill(charts)
            for text in expected:  # in the page: a chart's legend may hide some of its lines' names
                page.get_by_text(text).first.wait_for(timeout=60_000, state="attached")
            if plot:
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.screenshot(path=shots / screenshot, full_page=True)
            return " ".join(page.inner_text("body").split())  # one space for every run of (non-breaking) spaces

        runs_page = show(links[0], "pretrain", "data/tokens (", "quantize_int4", screenshot="mlflow-runs.png")
        assert all(stage in runs_page for stage in TRACKED)
        p = load_params(repo / "params.yaml")
        for stage, methods in (("prune", p.prune.methods), ("quantize", p.quantize.methods)):
            assert re.search(rf"{stage}_\w+ \+{len(methods) - 1}", runs_page), f"{stage}'s models, Models column"
        registry = show(
            f"{mlflow_ui}/#/models/llm-pipeline", *(f"@ {alias}" for alias in ROLES), screenshot="mlflow-registry.png"
        )
        assert all(f"@ {alias}" in registry for alias in ROLES)
        heading = "Comparing 4 Runs from 1 Experiment"
        compare = show(links[2], heading, "bits_per_byte", screenshot="mlflow-compare.png", height=2000, plot=True)
        names = compare.split("Run Name:")[1].split("Start Time:")[0].split()
        assert names == [roles[role].info.run_name for role in ROLES]
        # the metrics table reads as its names column, then each metric's row of 4 values (4 significant digits)
        table = compare.split("Metrics Show diff only ")[1].split(" Artifacts ")[0].split()
        metrics = list(itertools.takewhile(lambda cell: not re.fullmatch(r"[-\d.e+NaN]+", cell), table))
        cells = table[len(metrics) :]
        shown = {metric: [float(c) for c in cells[4 * i : 4 * i + 4]] for i, metric in enumerate(metrics)}
        for metric in ("val_loss", "bits_per_byte", "file_bytes"):
            expected = [roles[role].data.metrics[metric] for role in ROLES]
            assert shown[metric] == pytest.approx(expected, rel=1e-3), metric
        curves = [f"{run} (train_loss)" for run in ("pretrain", "distill", "scratch", "prune_nm")]
        overlaid = {"expand": "prune", "charts": "train_loss", "plot": True}
        charts = show(links[4], "train_loss", *curves, screenshot="mlflow-charts.png", **overlaid)
        assert all(curve in charts for curve in curves)
        browser.close()


def experiment_id(client) -> str:
    return client.get_experiment_by_name("llm-pipeline").experiment_id


HOLD_SLOTS = """
import sys
from prefect.concurrency.sync import concurrency
with concurrency(sys.argv[1], occupy=int(sys.argv[2]), strict=True):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin: the slots are released, not left to a lease's expiry
"""


@contextlib.contextmanager
def slots_held(name: str, occupy: int, env: dict):
    """Another process holding `occupy` slots of a Prefect global concurrency limit for the length of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SLOTS, name, str(occupy)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def flow_logs(api: str, flow_run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    return "\n".join(log["message"] for log in httpx.post(f"{api}/logs/filter", json=body, timeout=30).json())


def test_flow_runs_share_the_machines_stage_slots_across_processes(repo, prefect_api, monkeypatch):
    """A stage waits while other processes hold all of the machine's stage slots."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from flows.pipeline import pipeline, stage_limit

    repo, env, _ = repo
    for key in ("PATH", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    env = os.environ.copy()
    max_concurrency = load_params(repo / "params.yaml").run.max_concurrency
    slots = stage_limit(max_concurrency)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with slots_held(slots, max_concurrency, env):
            # in this context: its Prefect settings point at the test's server
            flow_run = pool.submit(contextvars.copy_context().run, pipeline, repo=str(repo), return_state=True)
            running = TaskRunFilter(
                name=TaskRunFilterName(any_=["sources"]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
            )
            deadline = time.monotonic() + 120
            with get_client(sync_client=True) as client:
                while not (waiting := client.read_task_runs(task_run_filter=running)):
                    assert time.monotonic() < deadline and not flow_run.done(), "the flow starts its first stage"
                    time.sleep(0.5)
            time.sleep(3)
            assert "running sources" not in flow_logs(prefect_api, str(waiting[0].flow_run_id)), "no free slot"
        assert flow_run.result().is_completed(), "the slots were freed: the flow went on"
    while "running sources" not in flow_logs(prefect_api, str(waiting[0].flow_run_id)):  # logs arrive in batches
        assert time.monotonic() < deadline + 60, "the stage ran"
        time.sleep(0.5)


def test_a_down_prefect_server_stops_the_flow_command_in_one_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    env = os.environ | {"PREFECT_API_URL": dead, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Prefect server {dead} unreachable: ")
