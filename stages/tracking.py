"""MLflow runs for stages, tagged with the git commit, the stage and the DVC hashes of its inputs.

Store: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory (the repo root under DVC).
Tracking is best effort: if the store fails, the stage warns once and goes on.
"""

import contextlib
import logging
import os
import subprocess
import warnings
from pathlib import Path

import yaml

from stages.config import flatten

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
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


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict, inputs: list[str | Path]):
    """Open an MLflow run named after the stage; yields a StageRun (a no-op one if MLflow is unreachable)."""
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        if mlflow.get_experiment_by_name(experiment) is None:
            artifacts = os.environ.get("MLFLOW_ARTIFACT_ROOT") or (Path.cwd() / "mlartifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        mlflow.set_experiment(experiment)
        tags = {"stage": stage, "git_commit": git_commit()}
        tags |= {f"dvc.input.{p}": h for p, h in dvc_input_hashes(inputs).items()}
        active = mlflow.start_run(run_name=stage, tags=tags)
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
