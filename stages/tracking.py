"""MLflow runs for stages, tagged with the git commit, the stage and the DVC hashes of its inputs.

Store: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory (the repo root under DVC).
Tracking is best effort: if the store fails, the stage warns once and goes on.
"""

import concurrent.futures
import contextlib
import logging
import os
import subprocess
import warnings
from pathlib import Path

import yaml

from stages.config import flatten

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL_S = 5


PARENT_RUN_ENV = "LLM_PIPELINE_PARENT_RUN_ID"


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()) / 'mlflow.db'}"


def ui_link(experiment_id: str, run_id: str) -> str:
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_input_hashes(inputs: list[str | Path], lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """The md5 dvc.lock records for each input path that some stage outputs."""
    try:
        lock = yaml.safe_load(Path(lock_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    recorded = {
        out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])
    }
    return {str(p): recorded[str(p)] for p in inputs if str(p) in recorded}


class StageRun:
    """An MLflow run whose every call is guarded: a failing store disables it with one warning."""

    def __init__(self, mlflow_module):
        self._mlflow = mlflow_module

    def _call(self, fn: str, *args, **kwargs):
        if self._mlflow is None:
            return
        try:
            getattr(self._mlflow, fn)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop the stage
            warnings.warn(f"MLflow tracking disabled for this stage: {fn} failed: {e}", stacklevel=3)
            self._mlflow = None

    def log_params(self, params: dict) -> None:
        self._call("log_params", {k: str(v)[:500] for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        self._call("log_metrics", numeric, step=step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", str(path), artifact_path=path.name)
        elif path.exists():
            self._call("log_artifact", str(path))

    def register_model(self, model_dir: str | Path, name: str, alias: str) -> None:
        """Log model_dir's files under the run's `model/<alias>` and make them a version of registered model
        `name`, with `alias` pointing at it: the registry then answers "which run, commit and data made it"."""
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_artifacts(str(model_dir), artifact_path=f"model/{alias}")
            client = self._mlflow.MlflowClient()
            run = client.get_run(self._mlflow.active_run().info.run_id)
            lineage = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name, description="Models of the LLM pipeline, one alias per stage.")
            version = client.create_model_version(
                name, f"{run.info.artifact_uri}/model/{alias}", run_id=run.info.run_id, tags=lineage
            )
            client.set_registered_model_alias(name, alias, version.version)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow model registration of {model_dir} failed: {e}", stacklevel=2)


@contextlib.contextmanager
def _use_experiment(mlflow, experiment: str, root: Path | None = None) -> None:
    mlflow.set_tracking_uri(tracking_uri(root))
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = os.environ.get("MLFLOW_ARTIFACT_ROOT") or ((root or Path.cwd()) / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict, inputs: list[str | Path], system_metrics: bool = False):
    """Open an MLflow run named after the stage; yields a StageRun (a no-op one if MLflow is unreachable).
    Under a pipeline flow ($LLM_PIPELINE_PARENT_RUN_ID set), the run is nested in the flow's parent run.

    system_metrics: also sample CPU/GPU utilization and memory (MLflow's system metrics) while the run is open.
    """
    try:
        import mlflow

        _use_experiment(mlflow, experiment)
        tags = {"stage": stage, "git_commit": git_commit()}
        tags |= {f"dvc.input.{p}": h for p, h in dvc_input_hashes(inputs).items()}
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        parent = os.environ.get(PARENT_RUN_ENV)
        active = mlflow.start_run(
            run_name=stage, tags=tags, log_system_metrics=system_metrics, parent_run_id=parent or None
        )
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow unavailable ({tracking_uri()}): {e}; stage {stage} runs without tracking", stacklevel=3)
        yield StageRun(None)
        return
    run = StageRun(mlflow)
    run.log_params(params)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
            log.info("MLflow run %s (%s) %s", active.info.run_id, stage, status.lower())


class PipelineRun:
    """The MLflow parent run of one pipeline flow run; stage runs nest under it through the environment.
    It is opened in a background thread: importing MLflow and opening its store take seconds that overlap the
    flow's own start-up; env() and mark_cached() wait for it. If the store fails, it warns once and is a no-op."""

    def __init__(self, experiment: str, root: Path):
        self.root = root
        self._opened = concurrent.futures.ThreadPoolExecutor(1).submit(self._open, experiment)

    def _open(self, experiment: str):
        try:
            import mlflow

            _use_experiment(mlflow, experiment, self.root)
            client = mlflow.MlflowClient()
            experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
            tags = {"stage": "pipeline", "git_commit": git_commit(self.root)}
            run = client.create_run(experiment_id, run_name="pipeline", tags=tags)
            return client, experiment_id, run.info.run_id
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow unavailable ({tracking_uri(self.root)}): {e}; no parent run", stacklevel=2)
            return None

    def env(self) -> dict[str, str]:
        opened = self._opened.result()
        return {PARENT_RUN_ENV: opened[2]} if opened else {}

    def mark_cached(self, cached: list[str]) -> dict[str, str]:
        """A child run per stage DVC skipped, tagged cached=true and made_by=<the newest run of that stage that
        did run>; returns {stage: link} for every stage run under this parent."""
        opened = self._opened.result()
        if opened is None:
            return {}
        client, experiment_id, run_id = opened
        try:
            for stage in cached:
                finished = client.search_runs(
                    [experiment_id],
                    f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                    order_by=["attributes.start_time DESC"],
                    max_results=50,
                )
                made = [r for r in finished if r.data.tags.get("cached") != "true"]  # a missing tag fails "!="
                tags = {"stage": stage, "cached": "true", "git_commit": git_commit(self.root)}
                tags["mlflow.parentRunId"] = run_id
                if made:
                    tags["made_by"] = made[0].info.run_id
                child = client.create_run(experiment_id, run_name=stage, tags=tags)
                client.set_terminated(child.info.run_id, "FINISHED")
            children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
            return {r.data.tags["stage"]: ui_link(experiment_id, r.info.run_id) for r in children}
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow: marking cached stages failed: {e}", stacklevel=2)
            return {}

    def close(self, status: str) -> None:
        opened = self._opened.result()
        if opened:
            with contextlib.suppress(Exception):
                opened[0].set_terminated(opened[2], status)


@contextlib.contextmanager
def pipeline_run(experiment: str, root: Path):
    """The parent run of a pipeline flow run (named "pipeline", tagged with the commit), ended FINISHED or
    FAILED with the flow."""
    run = PipelineRun(experiment, root)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.close(status)
