import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from stages.tracking import dvc_input_hashes, stage_run, sync

STUDENT = {"model": "distill", "role": "student", "made_from": "pretrain", "method": "distill"}


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
    [dataset] = found.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest, dataset.dataset.source_type) == ("data/tokens", "abc", "dvc")
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "pretrain")]


HELPED_STAGE = """
import os, sys
from stages.tracking import StageRunProcess
with StageRunProcess("pretrain", "exp", {"pretrain": {"train": {"lr": 0.1}}}, ["data/tokens"]) as run:
    run.log_metrics({"loss": 1.5, "nested": {"x": 2}}, step=3)
    if sys.argv[1] == "dies":
        os._exit(9)
"""


def test_a_run_kept_by_a_helper_process_logs_what_the_stage_sends_and_ends_failed_if_the_stage_dies(tmp_path):
    """What `python -m stages <stage>` does: the run opens in a helper process and the stage's calls go there."""
    lock = {"stages": {"tokenize": {"outs": [{"path": "data/tokens", "md5": "abc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_TRACKING_URI": uri}
    for how in ("lives", "dies"):
        proc = subprocess.run(
            [sys.executable, "-c", HELPED_STAGE, how], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == (0 if how == "lives" else 9), proc.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    lived, died = sorted(
        mlflow.search_runs(experiment_names=["exp"], output_format="list"), key=lambda r: r.info.start_time
    )
    for run in (lived, died):
        assert run.info.run_name == "pretrain" and run.data.params["pretrain.train.lr"] == "0.1"
        assert run.data.metrics == {"loss": 1.5, "nested.x": 2.0}
        assert run.data.tags["stage"] == "pretrain" and run.data.tags["dvc.input.data/tokens"] == "abc.dir"
        [dataset] = run.inputs.dataset_inputs
        assert (dataset.dataset.name, dataset.dataset.digest) == ("data/tokens", "abc")
    assert (lived.info.status, died.info.status) == ("FINISHED", "FAILED")


def test_an_unreachable_store_spools_the_run_and_sync_replays_all_of_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no-such-dir/mlflow.db")
    report, model = tmp_path / "report.md", tmp_path / "models" / "distill"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"n_layer": 1}')
    report.write_text("# before the replay")
    with pytest.warns(UserWarning, match=r"stage distill spools its run to .*\.mlflow-spool"):
        with stage_run("distill", "exp", {"distill": {"alpha": 0.5}}, []) as run:
            for step in range(1, 4):
                run.log_metrics({"loss": 1 / step}, step=step)
            run.log_artifact(report)
            run.register_model(model, "exp", "distill", STUDENT)
            run.promote(model, "exp", ["student"])
            run.start_child("distill", STUDENT)  # a model's row, as evaluate logs it
            run.log_metrics({"val_loss": 2.5}, child="distill", model_dir=model)
    report.write_text("# changed after the stage")  # the spool kept the file as the stage logged it
    shutil.rmtree(model)
    [spooled] = list((tmp_path / ".mlflow-spool").iterdir())

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert sync() and not spooled.exists() and sync() == []
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    [found] = mlflow.search_runs(experiment_names=["exp"], filter_string="tags.stage = 'distill'", output_format="list")
    assert found.info.status == "FINISHED" and found.data.tags["spooled"] == "true"
    assert found.data.params == {"distill.alpha": "0.5"} and found.data.tags["stage"] == "distill"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3)]  # fmt: skip
    [row] = client.search_runs([found.info.experiment_id], f"tags.mlflow.parentRunId = '{found.info.run_id}'")
    assert row.info.run_name == "distill" and row.info.status == "FINISHED" and row.data.tags["role"] == "student"
    [logged] = client.search_logged_models([found.info.experiment_id])
    assert logged.source_run_id == found.info.run_id and [(m.key, m.value, m.run_id) for m in logged.metrics] == [
        ("val_loss", 2.5, row.info.run_id)]  # fmt: skip
    logged = mlflow.artifacts.download_artifacts(f"{found.info.artifact_uri}/report.md", dst_path=str(tmp_path / "a"))
    assert Path(logged).read_text() == "# before the replay"
    assert client.get_model_version_by_alias("exp", "student").run_id == found.info.run_id


def test_a_spool_still_being_written_is_left_alone_and_a_cut_short_one_ends_failed(tmp_path, monkeypatch):
    from stages.tracking import Spool, Tracker

    monkeypatch.chdir(tmp_path)
    header = {"experiment": "exp", "run_name": "pretrain", "tags": {"stage": "pretrain"}, "start_time": 0}
    writing = Tracker(header=header, spool=Spool.create(header))
    writing.log_metrics({"loss": 2.0}, step=1)
    writing.spool.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    hold = (
        "import fasteners, sys, time; held = fasteners.InterProcessLock(sys.argv[1]); held.acquire(); "
        "print(1, flush=True); time.sleep(60)"
    )
    stage = subprocess.Popen(
        [sys.executable, "-c", hold, writing.spool.folder / "writing.lock"], stdout=subprocess.PIPE
    )
    stage.stdout.readline()
    assert sync() == [], "its stage still runs"
    stage.kill()  # it dies with no end recorded, its last line cut short
    stage.wait()
    with (writing.spool.folder / "calls.jsonl").open("a") as f:
        f.write('{"call": "log_met')
    [run_id] = sync()
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"loss": 2.0}


def test_input_hashes_skip_paths_no_stage_outputs(tmp_path):
    assert dvc_input_hashes(["anything"], tmp_path / "missing.lock") == {}


def test_system_metrics_and_a_registered_model_version_with_lineage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr("stages.tracking.SYSTEM_METRICS_INTERVAL_S", 1)
    model = tmp_path / "models" / "pretrain"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    teacher = {"model": "pretrain", "role": "teacher", "made_from": "-", "method": "pretrain"}
    with stage_run("pretrain", "exp", {}, [], system_metrics=True) as run:
        time.sleep(2.5)
        run.register_model(model, "exp", "pretrain", teacher)
    client = mlflow.MlflowClient()
    [found] = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert any(k.startswith("system/cpu_utilization") for k in found.data.metrics), found.data.metrics
    version = client.get_model_version_by_alias("exp", "pretrain")
    with pytest.raises(mlflow.MlflowException):
        client.get_model_version_by_alias("exp", "teacher")  # a role is evaluate's to give, once gates passed
    with stage_run("evaluate", "exp", {}, []) as run:
        run.promote(model, "exp", ["teacher", "champion"])
    assert client.get_model_version_by_alias("exp", "teacher").version == version.version, "the role's alias"
    assert client.get_model_version_by_alias("exp", "champion").version == version.version
    assert version.run_id == found.info.run_id and version.tags["git_commit"] == found.data.tags["git_commit"]
    [output] = found.outputs.model_outputs  # the runs table's Models column
    logged = client.get_logged_model(output.model_id)
    assert version.source == f"models:/{logged.model_id}" and logged.source_run_id == found.info.run_id
    assert teacher.items() <= logged.tags.items() and logged.tags["stage"] == "pretrain"
    assert mlflow.artifacts.download_artifacts("models:/exp@teacher/config.json", dst_path=str(tmp_path / "dl"))
    experiment = client.get_experiment(found.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on runs, not GenAI"


def test_a_model_row_is_a_child_run_whose_metrics_are_the_logged_models_on_the_val_tokens(tmp_path, monkeypatch):
    """What evaluate logs per model: a child run with the model's tags, its metrics also the metrics of the
    logged model the model's stage made of the same files, measured on a dataset with its schema."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model, tokens, curated = tmp_path / "models" / "distill", tmp_path / "data/tokens", tmp_path / "data/curated"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    tokens.mkdir(parents=True)
    splits = {"train": {"tokens": 900}, "val": {"tokens": 100}}
    (tokens / "meta.json").write_text(json.dumps({"dtype": "uint16", "splits": splits}))
    (curated / "val").mkdir(parents=True)
    pd.DataFrame({"text": ["a", "b", "c"], "id": [1, 2, 3]}).to_parquet(curated / "val" / "part-0.parquet")
    outs = [{"path": "data/tokens", "md5": "tok.dir"}, {"path": "data/curated", "md5": "cur.dir"}]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"s": {"outs": outs}}}))
    with stage_run("distill", "exp", {}, ["data/curated"]) as run:
        run.register_model(model, "exp", "distill", STUDENT)
    with stage_run("evaluate", "exp", {}, ["data/tokens"]) as run:
        run.start_child("distill", STUDENT)
        run.log_inputs({"data/tokens": "tok.dir"}, "eval", child="distill")
        run.log_metrics({"val_loss": 2.0, "file_bytes": 7}, child="distill", model_dir=model, dataset="data/tokens")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("exp").experiment_id
    stages = {r.data.tags["stage"]: r for r in client.search_runs([experiment], "tags.stage != ''")}
    [row] = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{stages['evaluate'].info.run_id}'")
    assert row.info.run_name == "distill" and row.info.status == "FINISHED"
    assert STUDENT.items() <= row.data.tags.items() and row.data.metrics == {"val_loss": 2.0, "file_bytes": 7.0}
    [logged] = client.search_logged_models([experiment])
    assert logged.source_run_id == stages["distill"].info.run_id
    linked = {m.key: (m.value, m.dataset_name, m.dataset_digest) for m in logged.metrics}
    assert linked == {"val_loss": (2.0, "data/tokens", "tok"), "file_bytes": (7.0, "data/tokens", "tok")}
    [val] = row.inputs.dataset_inputs
    assert json.loads(json.loads(val.dataset.schema)["mlflow_tensorspec"]["features"])[1]["tensor-spec"] == {
        "dtype": "uint16", "shape": [100]}  # fmt: skip
    [table] = stages["distill"].inputs.dataset_inputs
    assert json.loads(table.dataset.schema) == {
        "mlflow_colspec": [{"name": "text", "type": "string"}, {"name": "id", "type": "long"}]}  # fmt: skip
    assert json.loads(table.dataset.profile) == {"num_rows": 3}


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


@pytest.mark.parametrize(
    "store", ["http://team:s3cret@127.0.0.1:{port}", "postgresql://team:s3cret@127.0.0.1:{port}/db"]
)
def test_required_tracking_stops_a_stage_before_any_work_without_leaking_the_password(store, tmp_path):
    """A tracking server or a database store that is down: one line, in seconds (MLflow itself retries for
    minutes), naming the store without its password."""
    from flows.server import free_port

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "dvc.yaml", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"run": {"tracking": "required"}}))
    dead = store.format(port=free_port())
    env = os.environ | {"PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": dead}
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "tokenize"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if "failed:" in line]
    assert f"tokenize failed: MLflow tracking store {dead.replace('s3cret', '***')} unreachable" in line
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists(), "nothing was done"


def test_best_effort_tracking_warns_at_once_when_a_server_is_down(tmp_path, monkeypatch):
    from flows.server import free_port

    monkeypatch.chdir(tmp_path)  # where the run is spooled
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.warns(UserWarning, match=r"MLflow tracking store http://127\.0\.0\.1:\d+ unreachable"):
        with stage_run("curate", "exp", {}, []) as run:
            run.log_metrics({"x": 1})
