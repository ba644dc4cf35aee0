"""MLflow runs for stages, tagged with the git commit, the stage and the DVC hashes of its inputs.

Store: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the repo root (the working directory under DVC,
$DVC_ROOT for a `dvc exp` run in a temporary copy).
Tracking is best effort: if the store fails, the stage warns once and goes on.
"""

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

import yaml

from stages.config import flatten

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL_S = 5


PARENT_RUN_ENV = "LLM_PIPELINE_PARENT_RUN_ID"
# a stage started before the flow's parent run exists carries this instead; the parent adopts it later
PIPELINE_TOKEN_ENV = "LLM_PIPELINE_RUN_TOKEN"

# registry aliases by role, besides each model's own name (Params.models()), for who asks "the int8 one"
ROLE_ALIASES = {
    "pretrain": ["teacher"],
    "distill": ["student"],
    "quantize_int8": ["int8"],
    "quantize_int4_gptq": ["int4"],
}


def repo_root(root: Path | None = None) -> Path:
    """Where the default store lives: the repo, also for a `dvc exp` run in a temporary copy of it (DVC points
    $DVC_ROOT at the repo that queued it)."""
    return root or Path(os.environ.get("DVC_ROOT") or Path.cwd())


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / 'mlflow.db'}"


def ui_link(experiment_id: str, run_id: str) -> str:
    return f"{os.environ.get('MLFLOW_UI_URL', 'http://127.0.0.1:5000')}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_link(experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's side-by-side view of these runs."""
    runs, experiments = (json.dumps(v, separators=(",", ":")) for v in (run_ids, [experiment_id]))
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/compare-runs?runs={runs}&experiments={experiments}"


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


class Tracker:
    """A stage's MLflow run, every call guarded: a failing store disables it with one warning. Tracker(None), as
    NO_TRACKING, tracks nothing (tests, the other ranks of a distributed run, stages that run every time)."""

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

    def register_model(self, model_dir: str | Path, name: str, model: str) -> None:
        """Log model_dir's files under the run's `model/<model>` and make them a version of registered model
        `name`, with alias `model` (and its role's, e.g. `teacher`, see ROLE_ALIASES) pointing at it: the
        registry then answers "which run, commit and data made it"."""
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_artifacts(str(model_dir), artifact_path=f"model/{model}")
            client = self._mlflow.MlflowClient()
            run = client.get_run(self._mlflow.active_run().info.run_id)
            lineage = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name, description="Models of the LLM pipeline, one alias per stage.")
            version = client.create_model_version(
                name, f"{run.info.artifact_uri}/model/{model}", run_id=run.info.run_id, tags=lineage
            )
            for alias in [model, *ROLE_ALIASES.get(model, [])]:
                client.set_registered_model_alias(name, alias, version.version)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow model registration of {model_dir} failed: {e}", stacklevel=2)


NO_TRACKING = Tracker(None)


def is_server(uri: str) -> bool:
    """A tracking server (http, https, databricks...), as opposed to a database or folder this machine opens."""
    return "://" in uri and not uri.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql"))


class TrackingUnavailable(RuntimeError):
    """run.tracking is `required` and the tracking store cannot be reached: the stage stops before any work."""


def redacted(text: str, uri: str) -> str:
    """text without the password that uri carries, if any (postgresql://user:password@..., https://...)."""
    password = urllib.parse.urlsplit(uri).password
    return text.replace(password, "***") if password else text


def _probe(uri: str) -> None:
    """A tracking server answers /health within seconds, or this raises: MLflow's own client retries a refused
    connection for minutes before it gives up."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            pass


def _use_experiment(mlflow, experiment: str, root: Path | None = None) -> None:
    """Create the experiment if it is new: against a server, with the server's artifact store (models and reports
    then never live on the machine that ran the stage); on a local store, beside it in mlartifacts/."""
    uri = tracking_uri(root)
    with _first_access_lock(uri):
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            local = os.environ.get("MLFLOW_ARTIFACT_ROOT") or (repo_root(root) / "mlartifacts").as_uri()
            try:
                mlflow.create_experiment(experiment, artifact_location=None if is_server(uri) else local)
            except Exception:  # noqa: BLE001 - another process may have created it at the same moment
                if mlflow.get_experiment_by_name(experiment) is None:
                    raise
        mlflow.set_experiment(experiment)


def _first_access_lock(uri: str):
    """A lock file beside a SQLite store: two processes that open a new store at once (the flow's parent run and
    an early stage) race in MLflow's table creation, and one of them fails."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    import fasteners

    return fasteners.InterProcessLock(uri.removeprefix("sqlite:///") + ".lock")


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: dict,
    inputs: list[str | Path],
    system_metrics: bool = False,
    required: bool = False,
):
    """Open an MLflow run named after the stage; yields its Tracker (NO_TRACKING if MLflow is unreachable).
    Under a pipeline flow ($LLM_PIPELINE_PARENT_RUN_ID set), the run is nested in the flow's parent run.

    system_metrics: also sample CPU/GPU utilization and memory (MLflow's system metrics) while the run is open.
    required: an unreachable store raises TrackingUnavailable instead (run.tracking: required).
    """
    uri = tracking_uri()
    try:
        import mlflow

        _probe(uri)
        _use_experiment(mlflow, experiment)
        tags = {"stage": stage, "git_commit": git_commit()}
        if experiment_name := os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`
            tags["dvc_experiment"] = experiment_name
        tags |= {f"dvc.input.{p}": h for p, h in dvc_input_hashes(inputs).items()}
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        if token := os.environ.get(PIPELINE_TOKEN_ENV):
            tags["pipeline_token"] = token
        parent = os.environ.get(PARENT_RUN_ENV)
        active = mlflow.start_run(
            run_name=stage, tags=tags, log_system_metrics=system_metrics, parent_run_id=parent or None
        )
    except Exception as e:  # noqa: BLE001
        failure = redacted(f"MLflow tracking store {uri} unreachable: {e}", uri)
        if required:
            raise TrackingUnavailable(failure) from None
        warnings.warn(f"{failure}; stage {stage} runs without tracking", stacklevel=3)
        yield NO_TRACKING
        return
    run = Tracker(mlflow)
    run.log_params(params)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
            log.info("MLflow run %s (%s) %s", active.info.run_id, stage, status.lower())


def _adopt(client, experiment_id: str, run_id: str, token: str) -> None:
    """Nest under run_id the stage runs that started before it existed, tagged with the flow's token."""
    for early in client.search_runs([experiment_id], f"tags.pipeline_token = '{token}'"):
        client.set_tag(early.info.run_id, "mlflow.parentRunId", run_id)


def _mark_cached(client, experiment_id: str, run_id: str, token: str, cached: list[str], root: Path) -> dict[str, str]:
    """Adopt the early stage runs, and add a child run of run_id per stage DVC skipped, tagged cached=true and
    made_by=<the newest run of that stage that did run, on the inputs dvc.lock now records (not, say, a sweep
    experiment's)>; returns {stage: link} for every stage run under run_id."""
    _adopt(client, experiment_id, run_id, token)
    commit = git_commit(root)

    def on_current_inputs(run) -> bool:
        used = {k.removeprefix("dvc.input."): v for k, v in run.data.tags.items() if k.startswith("dvc.input.")}
        return dvc_input_hashes(list(used), root / "dvc.lock") == used

    for stage in cached:
        finished = client.search_runs(
            [experiment_id],
            f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        # a missing tag fails "!=" in MLflow's filter, so cached runs are left out here
        made = [r for r in finished if r.data.tags.get("cached") != "true" and on_current_inputs(r)]
        tags = {"stage": stage, "cached": "true", "git_commit": commit, "mlflow.parentRunId": run_id}
        if made:
            tags["made_by"] = made[0].info.run_id
        child = client.create_run(experiment_id, run_name=stage, tags=tags)
        client.set_terminated(child.info.run_id, "FINISHED")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.data.tags["stage"]: ui_link(experiment_id, r.info.run_id) for r in children}


def _serve_parent_run(experiment: str, root: Path, token: str) -> None:
    """The helper process of PipelineRun, speaking JSON lines: prints {"run_id"}, reads {"cached"}, prints the
    stage links, reads {"status"}, ends the run and prints {"ended"}."""
    try:
        import mlflow

        _use_experiment(mlflow, experiment, root)
        client = mlflow.MlflowClient()
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        tags = {"stage": "pipeline", "git_commit": git_commit(root)}
        run_id = client.create_run(experiment_id, run_name="pipeline", tags=tags).info.run_id
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"MLflow unavailable ({tracking_uri(root)}): {e}"}), flush=True)
        return
    print(json.dumps({"run_id": run_id}), flush=True)
    status = "FAILED"
    try:
        for line in sys.stdin:
            message = json.loads(line)
            if "cached" in message:
                links = _mark_cached(client, experiment_id, run_id, token, message["cached"], root)
                print(json.dumps(links), flush=True)
            elif "status" in message:
                status = message["status"]
                break
    finally:
        with contextlib.suppress(Exception):  # a flow that failed early still nests what it ran
            _adopt(client, experiment_id, run_id, token)
        client.set_terminated(run_id, status)
        print(json.dumps({"ended": run_id}), flush=True)


class PipelineRun:
    """The MLflow parent run of one pipeline flow run; stage runs nest under it through the environment.
    A helper process opens it and marks the cached stages: importing MLflow and opening its store take seconds
    that then run on another core beside the flow's own start-up. If the store fails, this warns once and
    does nothing more."""

    def __init__(self, experiment: str, root: Path):
        self._token = uuid.uuid4().hex
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "stages.tracking", experiment, str(root), self._token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._run_id: str | None = None
        self._opened = threading.Thread(target=self._await_run, daemon=True)
        self._opened.start()

    def _receive(self) -> dict:
        for line in self._helper.stdout:  # a library may print too: the answer is the next JSON object
            if line.startswith("{"):
                return json.loads(line)
        return {"error": "the MLflow helper process ended without an answer"}

    def _await_run(self) -> None:
        answer = self._receive()
        if "error" in answer:
            warnings.warn(f"{answer['error']}; no parent run", stacklevel=2)
        self._run_id = answer.get("run_id")

    def _open(self) -> str | None:
        self._opened.join()
        return self._run_id

    def _send(self, message: dict) -> None:
        self._helper.stdin.write(json.dumps(message) + "\n")
        self._helper.stdin.flush()

    def env(self) -> dict[str, str]:
        """For a stage's process: the parent run's id, or, while the helper is still starting, the token by which
        the parent adopts the stage's run later (a stage never waits for MLflow)."""
        if self._opened.is_alive():
            return {PIPELINE_TOKEN_ENV: self._token}
        return {PARENT_RUN_ENV: self._run_id} if self._run_id else {}

    def mark_cached(self, cached: list[str]) -> dict[str, str]:
        """A child run per stage DVC skipped, marked cached and linked to the run that made its outputs; returns
        {stage: link} for every stage run under this parent."""
        if self._open() is None:
            return {}
        self._send({"cached": cached})
        answer = self._receive()
        if "error" in answer:
            warnings.warn(f"MLflow: marking cached stages failed: {answer['error']}", stacklevel=2)
            return {}
        return answer

    def close(self, status: str) -> None:
        """End the run; returns once the store has it, not when the helper's interpreter is done exiting."""
        if self._open() is not None:
            with contextlib.suppress(OSError):
                self._send({"status": status})
                self._receive()
        with contextlib.suppress(OSError):
            self._helper.stdin.close()
        threading.Thread(target=self._helper.wait, daemon=True).start()


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


if __name__ == "__main__":
    _serve_parent_run(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
