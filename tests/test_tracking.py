import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from stages.tracking import dvc_input_hashes, stage_run


def test_stage_run_logs_params_metrics_and_lineage_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    lock = {"stages": {"tokenize": {"outs": [{"path": "data/tokens", "md5": "abc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    with stage_run("pretrain", "exp", {"pretrain": {"train": {"lr": 0.1}}}, ["data/tokens"]) as run:
        run.log_metrics({"loss": 1.5, "nested": {"x": 2}}, step=3)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [found] = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert found.info.run_name == "pretrain" and found.info.status == "FINISHED"
    assert found.data.params["pretrain.train.lr"] == "0.1"
    assert found.data.metrics == {"loss": 1.5, "nested.x": 2.0}
    assert found.data.tags["stage"] == "pretrain" and found.data.tags["dvc.input.data/tokens"] == "abc.dir"
    assert "git_commit" in found.data.tags


def test_unreachable_store_warns_and_the_stage_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no-such-dir/mlflow.db")
    ran = []
    with pytest.warns(UserWarning, match="runs without tracking"):
        with stage_run("curate", "exp", {}, []) as run:
            run.log_metrics({"x": 1})
            ran.append(True)
    assert ran


def test_input_hashes_skip_paths_no_stage_outputs(tmp_path):
    assert dvc_input_hashes(["anything"], tmp_path / "missing.lock") == {}


def test_system_metrics_and_a_registered_model_version_with_lineage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr("stages.tracking.SYSTEM_METRICS_INTERVAL_S", 1)
    model = tmp_path / "models" / "pretrain"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with stage_run("pretrain", "exp", {}, [], system_metrics=True) as run:
        time.sleep(2.5)
        run.register_model(model, "exp", "pretrain")
    client = mlflow.MlflowClient()
    [found] = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert any(k.startswith("system/cpu_utilization") for k in found.data.metrics), found.data.metrics
    version = client.get_model_version_by_alias("exp", "pretrain")
    assert client.get_model_version_by_alias("exp", "teacher").version == version.version, "the role's alias"
    assert version.run_id == found.info.run_id and version.tags["git_commit"] == found.data.tags["git_commit"]
    assert mlflow.artifacts.download_artifacts(f"{version.source}/config.json", dst_path=str(tmp_path / "dl"))


def test_pipeline_parent_run_nests_stages_and_marks_cached_ones(tmp_path, monkeypatch):
    from stages.tracking import PARENT_RUN_ENV, PIPELINE_TOKEN_ENV, pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with stage_run("pretrain", "exp", {}, []):  # the run that made pretrain's outputs
        pass
    with pipeline_run("exp", tmp_path) as parent:
        early = parent.env()
        assert set(early) == {PIPELINE_TOKEN_ENV}, "MLflow is still starting in the helper: no stage waits for it"
        with monkeypatch.context() as env:
            env.setenv(PIPELINE_TOKEN_ENV, early[PIPELINE_TOKEN_ENV])
            with stage_run("sources", "exp", {}, []):  # a stage that started before the parent run existed
                pass
        parent.mark_cached([])  # waits for the parent run, adopts the early stage run
        monkeypatch.setenv(PARENT_RUN_ENV, parent.env()[PARENT_RUN_ENV])
        with stage_run("distill", "exp", {}, []):  # a stage that runs under the flow
            pass
        links = parent.mark_cached(["pretrain"])
    mlflow.set_tracking_uri(uri)
    runs = {(r.data.tags["stage"], r.data.tags.get("cached")): r for r in mlflow.search_runs(
        experiment_names=["exp"], output_format="list")}  # fmt: skip
    top = runs[("pipeline", None)]
    assert top.info.status == "FINISHED" and set(links) == {"sources", "distill", "pretrain"}
    assert runs[("distill", None)].data.tags["mlflow.parentRunId"] == top.info.run_id
    assert runs[("sources", None)].data.tags["mlflow.parentRunId"] == top.info.run_id, "adopted"
    cached = runs[("pretrain", "true")]
    assert cached.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert cached.data.tags["made_by"] == runs[("pretrain", None)].info.run_id


def test_a_failed_flow_still_nests_the_stage_runs_it_started(tmp_path, monkeypatch):
    from stages.tracking import PIPELINE_TOKEN_ENV, pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), pipeline_run("exp", tmp_path) as parent:
        monkeypatch.setenv(PIPELINE_TOKEN_ENV, parent.env()[PIPELINE_TOKEN_ENV])
        with stage_run("ingest", "exp", {}, []):
            pass
        raise RuntimeError("a later stage failed")
    mlflow.set_tracking_uri(uri)
    runs = {r.data.tags["stage"]: r for r in mlflow.search_runs(experiment_names=["exp"], output_format="list")}
    assert runs["pipeline"].info.status == "FAILED"
    assert runs["ingest"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id


def test_required_tracking_stops_a_stage_before_any_work_without_leaking_the_password(tmp_path):
    from flows.server import free_port

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "dvc.yaml", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"run": {"tracking": "required"}}))
    dead = f"http://team:s3cret@127.0.0.1:{free_port()}"
    env = os.environ | {"PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": dead}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.tokenize"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if "failed:" in line]
    assert "tokenize failed: MLflow tracking store http://team:***@127.0.0.1" in line and "unreachable" in line
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists(), "nothing was done"


def test_best_effort_tracking_warns_at_once_when_a_server_is_down(monkeypatch):
    from flows.server import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.warns(UserWarning, match=r"MLflow tracking store http://127\.0\.0\.1:\d+ unreachable"):
        with stage_run("curate", "exp", {}, []) as run:
            run.log_metrics({"x": 1})
