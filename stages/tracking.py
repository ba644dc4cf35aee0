"""MLflow runs for stages, tagged with the git commit, the stage and the DVC hashes of its inputs.

Store: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the repo root (the working directory under DVC,
$DVC_ROOT for a `dvc exp` run in a temporary copy).
No run is lost when the store is out of reach: the stage warns once, spools the run under .mlflow-spool/ and
goes on; `python -m stages.tracking sync` (and the next pipeline flow run) replays it.
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

import yaml

from lm import io
from stages import dvcfile
from stages.config import ROLES, flatten

log = logging.getLogger("stages.tracking")  # also in its helper process, where __name__ is __main__

SYSTEM_METRICS_INTERVAL_S = 5


SPOOL = ".mlflow-spool"
SYNC = "`python -m stages.tracking sync` replays it"

PARENT_RUN_ENV = "LLM_PIPELINE_PARENT_RUN_ID"
# a stage started before the flow's parent run exists carries this instead; the parent adopts it later
PIPELINE_TOKEN_ENV = "LLM_PIPELINE_RUN_TOKEN"

EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens such an experiment on its runs and models, not GenAI's
MODEL_TYPE = "llm-pipeline"  # the logged models' type, to search or filter them by
CHILD_LINEAGE = ("git_commit", "dvc_experiment")  # the stage run's tags its child runs carry too


def repo_root(root: Path | None = None) -> Path:
    """Where the default store lives: the repo, also for a `dvc exp` run in a temporary copy of it (DVC points
    $DVC_ROOT at the repo that queued it)."""
    return root or Path(os.environ.get("DVC_ROOT") or Path.cwd())


def spool_root(root: Path | None = None) -> Path:
    return repo_root(root) / SPOOL


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / 'mlflow.db'}"


def ui_link(experiment_id: str, run_id: str) -> str:
    return f"{os.environ.get('MLFLOW_UI_URL', 'http://127.0.0.1:5000')}/#/experiments/{experiment_id}/runs/{run_id}"


TRAINING_VIEW = "workflowType=machine_learning"  # the UI's model-training menus, not its GenAI ones


def compare_link(experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's side-by-side view of these runs."""
    runs, experiments = (json.dumps(v, separators=(",", ":")) for v in (run_ids, [experiment_id]))
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/compare-runs?runs={runs}&experiments={experiments}&{TRAINING_VIEW}"


def runs_link(experiment_id: str, search: str = "", charts: bool = False) -> str:
    """The MLflow UI's runs table (or, charts, its chart view) of the runs that match `search`."""
    query = urllib.parse.urlencode({"searchFilter": search} | ({"compareRunsMode": "CHART"} if charts else {}))
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}&{query}"


def views(experiment: str, root: Path | None = None) -> dict[str, str]:
    """Links to the MLflow UI views that answer "which variant is best for its size and speed", for the newest
    evaluate run: its model rows in the runs table, the four roles' rows and every row side by side, and the
    training curves overlaid."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(root))
    found = client.get_experiment_by_name(experiment)
    evaluated = found and client.search_runs(
        [found.experiment_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'", max_results=1
    )
    if not evaluated:
        raise LookupError(f"no finished evaluate run in MLflow experiment {experiment!r} at {tracking_uri(root)}")
    eid, children = found.experiment_id, f"tags.mlflow.parentRunId = '{evaluated[0].info.run_id}'"
    rows = {r.info.run_name: r for r in client.search_runs([eid], children, order_by=["attributes.run_name"])}
    roles = {r.data.tags.get("role"): r.info.run_id for r in rows.values()}
    four = [roles[role] for role in ROLES.values() if role in roles]
    return {
        "stage runs (Datasets and Models columns)": runs_link(eid, "tags.stage != ''"),
        "model rows of the newest evaluation": runs_link(eid, children),
        "teacher, student, int8, int4 side by side": compare_link(eid, four),
        "every model side by side": compare_link(eid, [r.info.run_id for r in rows.values()]),
        "training curves overlaid": runs_link(eid, "metrics.train_loss > 0", charts=True),
    }


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_input_hashes(inputs: list[str | Path], lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """The md5 dvc.lock records for each input path that some stage outputs."""
    try:
        lock = dvcfile.read_yaml(lock_file) or {}
    except (OSError, yaml.YAMLError):
        return {}
    recorded = {
        out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])
    }
    return {str(p): recorded[str(p)] for p in inputs if str(p) in recorded}


ARROW_TYPES = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer", "double": "double"}


def describe(path: str | Path) -> dict[str, str]:
    """The schema and profile the MLflow UI shows for a dataset, as JSON: a Parquet table's columns and rows, a
    token directory's splits (lm/tokens.py's meta.json) as tensors of token ids; nothing for other data."""
    import pyarrow.parquet as pq

    from lm.tokens import META

    path = Path(path)
    tables = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
    if tables:
        schema = pq.read_schema(tables[0])
        columns = [{"name": f.name, "type": ARROW_TYPES.get(str(f.type), str(f.type))} for f in schema]
        rows = sum(pq.read_metadata(t).num_rows for t in tables)
        return {"schema": json.dumps({"mlflow_colspec": columns}), "profile": json.dumps({"num_rows": rows})}
    if (path / META).is_file():
        meta = io.read_json(path / META)
        splits = meta["splits"]
        tensors = [
            {"name": split, "type": "tensor", "tensor-spec": {"dtype": meta["dtype"], "shape": [s["tokens"]]}}
            for split, s in splits.items()
        ]
        return {
            "schema": json.dumps({"mlflow_tensorspec": {"features": json.dumps(tensors), "targets": None}}),
            "profile": json.dumps({f"{split}_tokens": s["tokens"] for split, s in splits.items()}),
        }
    return {}


def model_digest(model_dir: str | Path) -> str:
    """A model directory's content hash: the stage that makes a model tags its logged model with it, and a
    later stage that scores the same files finds that logged model by it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        digest.update(file.relative_to(model_dir).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:32]


FILE_ARGS = ("path", "model_dir")  # the Tracker calls' arguments that name files: the spool keeps copies


class Spool:
    """A stage's run kept on disk while the tracking store is out of reach, until `python -m stages.tracking sync`
    replays it. <repo>/.mlflow-spool/<started>-<stage>/ holds run.json (experiment, run name, tags, start time,
    and the run's id on the store, if it got one), calls.jsonl (one logged call per line) and files/ (copies of
    the logged files: the stage's outputs may change before the replay). The process that writes it holds
    writing.lock, so a replay never takes a run that is still being spooled."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._writing = None

    @classmethod
    def create(cls, header: dict, root: Path | None = None) -> "Spool":
        import fasteners

        spool = cls(spool_root(root) / f"{time.time_ns()}-{header['run_name']}")
        (spool.folder / "files").mkdir(parents=True)
        spool._writing = fasteners.InterProcessLock(spool.folder / "writing.lock")
        spool._writing.acquire()
        io.write_json(spool.folder / "run.json", header)
        return spool

    def record(self, call: str, **kwargs) -> None:
        for key in FILE_ARGS:
            if key in kwargs:
                kwargs[key] = self._keep(Path(kwargs[key]))
        with (self.folder / "calls.jsonl").open("a") as f:
            f.write(json.dumps({"call": call, **kwargs}) + "\n")

    def _keep(self, path: Path) -> str:
        copy = self.folder / "files" / str(len(list((self.folder / "files").iterdir()))) / path.name
        copy.parent.mkdir()
        if path.is_dir():
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        return str(copy.relative_to(self.folder))

    def close(self) -> None:
        if self._writing is not None:
            self._writing.release()

    def calls(self) -> list[dict]:
        """The recorded calls, each with its files' paths made absolute again; a last line cut short by a crash
        is left out."""
        calls = []
        path = self.folder / "calls.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                call = json.loads(line)
            except json.JSONDecodeError:
                break
            for key in FILE_ARGS:
                if key in call:
                    call[key] = str(self.folder / call[key])
            calls.append(call)
        return calls


class Tracker:
    """A stage's MLflow run. If the store fails mid-run, the rest of the run is spooled (Spool) for a later
    replay, with one warning; the stage goes on. Tracker() as NO_TRACKING tracks nothing (tests, the other
    ranks of a distributed run, stages that run every time)."""

    def __init__(self, client=None, run_id: str | None = None, header: dict | None = None, spool: Spool | None = None):
        self._client, self.run_id, self._header, self.spool = client, run_id, header, spool
        self._children: dict[str, str] = {}  # child run name -> its run id
        self._logged_models: dict[str, str | None] = {}  # model digest -> logged model id

    def _send(self, call: str, **kwargs) -> None:
        if self._client is not None:
            try:
                getattr(self, f"_{call}")(**kwargs)
                return
            except Exception as e:  # noqa: BLE001 - any tracking failure must not stop the stage
                self._client = None
                self.spool = Spool.create(self._header | {"run_id": self.run_id})
                failure = redacted(f"MLflow {call} failed ({e})", tracking_uri())
                warnings.warn(
                    f"{failure}: the rest of the run is spooled to {self.spool.folder} ({SYNC})", stacklevel=3
                )
        if self.spool is not None:
            self.spool.record(call, **kwargs)

    def replay(self, calls: list[dict]) -> None:
        """Apply recorded calls to the run in order, raising on the first failure. Consecutive metric calls go as
        one request per run and 1000 metrics (MLflow's batch limit), not one per logged step."""
        batch, batch_run = [], None
        for call in calls:
            kind = call.pop("call")
            run = self._run_of(call.pop("child", None)) if kind == "log_metrics" else None
            if batch and run != batch_run:
                self._log_batch(batch_run, batch)
                batch = []
            if kind == "log_metrics":
                batch += self._metrics(**call)
                batch_run = run
            else:
                getattr(self, f"_{kind}")(**call)
        if batch:
            self._log_batch(batch_run, batch)

    def _log_batch(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_params(self, params: dict) -> None:
        self._send("log_params", params={k: str(v)[:500] for k, v in flatten(params).items()})

    def start_child(self, name: str, tags: dict[str, str]) -> None:
        """A run named `name` nested under this one (one per model the stage scores): the `child=name` of the
        other calls. It ends with this run."""
        lineage = {k: v for k, v in (self._header or {}).get("tags", {}).items() if k in CHILD_LINEAGE}
        self._send("start_child", name=name, tags=lineage | tags)

    def log_metrics(
        self,
        metrics: dict,
        step: int | None = None,
        child: str | None = None,
        model_dir: str | Path | None = None,
        dataset: str | Path | None = None,
    ) -> None:
        """model_dir: the metrics are also the logged model's of these files (the one its stage made); dataset:
        the input path (one of dvc.lock's outputs) they were measured on."""
        numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        if numeric:
            on = {"child": child, "model": model_dir and model_digest(model_dir)}
            for name, md5 in dvc_input_hashes([dataset] if dataset else []).items():
                on["dataset"] = [name, md5.removesuffix(".dir")]
            self._send("log_metrics", metrics=numeric, step=step or 0, timestamp=int(time.time() * 1000), **on)

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._send("log_artifact", path=str(path))

    def log_inputs(self, hashes: dict[str, str], context: str, child: str | None = None) -> None:
        """Each input as an MLflow dataset: named by its path, its digest the md5 dvc.lock records for it, with
        its schema and size where describe() knows them (the UI's Datasets column then shows which data made the
        run)."""
        datasets = [{"name": path, "md5": md5} | describe(path) for path, md5 in hashes.items()]
        if datasets:
            self._send("log_inputs", datasets=datasets, context=context, child=child)

    def register_model(self, model_dir: str | Path, name: str, model: str, tags: dict[str, str]) -> None:
        """Make model_dir's files a logged model of this run (the runs table's Models column), tagged with `tags`
        (Params.model_tags) and its content digest, and a version of registered model `name`, with aliases
        `model` and its role (e.g. `teacher`) pointing at it: the registry then answers "which run, commit and
        data made it", and the version links to the metrics evaluate logs against the logged model."""
        digest = model_digest(model_dir)
        self._send("register_model", model_dir=str(model_dir), name=name, model=model, tags=tags, digest=digest)

    def promote(self, model_dir: str | Path, name: str, aliases: list[str]) -> None:
        """Point `aliases` of registered model `name` at the version registered for model_dir's files (found by
        their content digest): evaluate moves the role aliases and `champion` only to versions whose gates
        passed."""
        if aliases:
            self._send("promote", name=name, digest=model_digest(model_dir), aliases=aliases)

    def end(self, status: str) -> None:
        self._send("end", status=status, end_time=int(time.time() * 1000))
        if self.spool is not None:
            self.spool.close()

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's most params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    @functools.cached_property
    def _experiment_id(self) -> str:
        return self._client.get_run(self.run_id).info.experiment_id

    def _run_of(self, child: str | None) -> str:
        return self._child_run(child) if child else self.run_id

    def _start_child(self, name: str, tags: dict[str, str]) -> None:
        self._children[name] = (
            self._child_run(name)
            or self._client.create_run(
                self._experiment_id, tags=tags | {"mlflow.parentRunId": self.run_id}, run_name=name
            ).info.run_id
        )

    def _child_run(self, name: str) -> str | None:
        """The id of this run's child named `name` (started before a replay, or by this process), if any."""
        if name not in self._children:
            query = f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.run_name = '{name}'"
            found = self._client.search_runs([self._experiment_id], query, max_results=1)
            if not found:
                return None
            self._children[name] = found[0].info.run_id
        return self._children[name]

    def _logged_model(self, digest: str | None) -> str | None:
        """The newest logged model of the files with this digest: what the stage that made them logged."""
        if digest and digest not in self._logged_models:
            found = self._client.search_logged_models(
                [self._experiment_id],
                filter_string=f"tags.digest = '{digest}'",
                order_by=[{"field_name": "creation_time", "ascending": False}],
                max_results=1,
            )
            self._logged_models[digest] = found[0].model_id if found else None
        return self._logged_models.get(digest)

    def _metrics(self, metrics: dict, step: int, timestamp: int, model=None, dataset: list | None = None) -> list:
        from mlflow.entities import Metric

        on = {"model_id": self._logged_model(model)}
        if dataset:
            on |= {"dataset_name": dataset[0], "dataset_digest": dataset[1]}
        return [Metric(k, v, timestamp, step, **on) for k, v in metrics.items()]

    def _log_metrics(self, metrics: dict, step: int, timestamp: int, child=None, **on) -> None:
        self._client.log_batch(self._run_of(child), metrics=self._metrics(metrics, step, timestamp, **on))

    def _log_inputs(self, datasets: list[dict], context: str, child=None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    d["name"],
                    d["md5"].removesuffix(".dir"),
                    "dvc",
                    json.dumps({"path": d["name"], "md5": d["md5"]}),
                    schema=d.get("schema"),
                    profile=d.get("profile"),
                ),
                [InputTag("mlflow.data.context", context)],
            )
            for d in datasets
        ]
        self._client.log_inputs(self._run_of(child), datasets=inputs)

    def _log_artifact(self, path: str) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, path, artifact_path=Path(path).name)
        else:
            self._client.log_artifact(self.run_id, path)

    def _register_model(self, model_dir: str, name: str, model: str, tags: dict[str, str], digest: str) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client = self._client
        run = client.get_run(self.run_id)
        lineage = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} | tags
        # a replay that was cut short and is run again makes no second logged model and no second version
        [logged] = client.search_logged_models(
            [run.info.experiment_id], f"source_run_id = '{self.run_id}' AND name = '{model}'", max_results=1
        ) or [
            client.create_logged_model(
                run.info.experiment_id, model, self.run_id, lineage | {"digest": digest}, model_type=MODEL_TYPE
            )
        ]
        if logged.status != LoggedModelStatus.READY:
            client.log_model_artifacts(logged.model_id, model_dir)
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        if logged.model_id not in {m.model_id for m in (run.outputs.model_outputs if run.outputs else [])}:
            client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description="Models of the LLM pipeline, one alias per stage.")
        source = f"models:/{logged.model_id}"
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        [version] = [v for v in versions if v.source == source] or [
            client.create_model_version(
                name, source, run_id=self.run_id, tags=lineage | {"digest": digest}, model_id=logged.model_id
            )
        ]
        client.set_registered_model_alias(name, model, version.version)  # role aliases: evaluate's promote

    def _promote(self, name: str, digest: str, aliases: list[str]) -> None:
        client = self._client
        versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("digest") == digest]
        if not versions:
            log.warning(
                "no version of registered model %s holds these files (digest %s): %s not moved", name, digest, aliases
            )
            return
        newest = max(versions, key=lambda v: int(v.version))
        for alias in aliases:
            client.set_registered_model_alias(name, alias, newest.version)

    def _end(self, status: str, end_time: int) -> None:
        children = f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'"
        for child in self._client.search_runs([self._experiment_id], children):
            self._client.set_terminated(child.info.run_id, status, end_time=end_time)
        self._client.set_terminated(self.run_id, status, end_time=end_time)


NO_TRACKING = Tracker()


def is_server(uri: str) -> bool:
    """A tracking server (http, https, databricks...), as opposed to a database or folder this machine opens."""
    return "://" in uri and not uri.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql"))


class TrackingUnavailable(RuntimeError):
    """run.tracking is `required` and the tracking store cannot be reached: the stage stops before any work."""


def redacted(text: str, uri: str) -> str:
    """text without the password that uri carries, if any (postgresql://user:password@..., https://...)."""
    password = urllib.parse.urlsplit(uri).password
    return text.replace(password, "***") if password else text


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _probe(uri: str) -> None:
    """A tracking server answers /health, and a database server accepts a connection, within seconds, or this
    raises: MLflow's own client retries a refused connection for minutes before it gives up."""
    # later calls too: a server that stops answering mid-run costs seconds, and the run is spooled
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # settings the user made are kept
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme in ("http", "https"):
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            pass
    elif scheme in DATABASE_PORTS and parts.hostname:
        socket.create_connection((parts.hostname, parts.port or DATABASE_PORTS[scheme]), timeout=5).close()


def use_experiment(mlflow, experiment: str, root: Path | None = None) -> str:
    """The experiment's id, creating it if it is new: against a server, with the server's artifact store (models
    and reports then never live on the machine that ran the stage); on a local store, beside it in mlartifacts/."""
    uri = tracking_uri(root)
    with _first_access_lock(uri):
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            local = os.environ.get("MLFLOW_ARTIFACT_ROOT") or (repo_root(root) / "mlartifacts").as_uri()
            try:
                mlflow.create_experiment(experiment, None if is_server(uri) else local)
            except Exception:  # noqa: BLE001 - another process may have created it at the same moment
                if mlflow.get_experiment_by_name(experiment) is None:
                    raise
        found = mlflow.set_experiment(experiment)
        if EXPERIMENT_KIND not in found.tags:  # also an experiment made before this tag was set
            mlflow.set_experiment_tag(EXPERIMENT_KIND, "custom_model_development")
        return found.experiment_id


def _first_access_lock(uri: str):
    """A lock file beside a SQLite store: two processes that open a new store at once (the flow's parent run and
    an early stage) race in MLflow's table creation, and one of them fails."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    import fasteners

    return fasteners.InterProcessLock(uri.removeprefix("sqlite:///") + ".lock")


def run_header(stage: str, experiment: str, inputs: list[str | Path]) -> tuple[dict, dict[str, str]]:
    """A stage run's experiment, name, tags (the stage, the commit, the DVC hashes of its inputs, the flow run it
    nests under) and start time; and the input hashes."""
    tags = {"stage": stage, "git_commit": git_commit()}
    if experiment_name := os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`
        tags["dvc_experiment"] = experiment_name
    hashes = dvc_input_hashes(inputs)
    tags |= {f"dvc.input.{p}": h for p, h in hashes.items()}
    if token := os.environ.get(PIPELINE_TOKEN_ENV):
        tags["pipeline_token"] = token
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    header = {"experiment": experiment, "run_name": stage, "tags": tags, "start_time": int(time.time() * 1000)}
    return header, hashes


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: dict,
    inputs: list[str | Path],
    system_metrics: bool = False,
    required: bool = False,
):
    """Open an MLflow run named after the stage; yields its Tracker. Under a pipeline flow
    ($LLM_PIPELINE_PARENT_RUN_ID set), the run is nested in the flow's parent run. If the store is out of reach,
    the run is spooled for `sync` to replay (the stage goes on), from the start or from the failing call on.

    system_metrics: also sample CPU/GPU utilization and memory (MLflow's system metrics) while the run is open.
    required: a store out of reach at the start raises TrackingUnavailable instead (run.tracking: required).
    """
    header, hashes = run_header(stage, experiment, inputs)
    with opened_run(header, system_metrics, required) as run:
        run.log_params(params)
        run.log_inputs(hashes, context=stage)
        yield run


@contextlib.contextmanager
def opened_run(header: dict, system_metrics: bool, required: bool):
    """The run `header` describes, opened on the store (or spooled), ended FINISHED, or FAILED on an exception."""
    uri, stage = tracking_uri(), header["run_name"]
    monitor = None
    try:
        import mlflow

        _probe(uri)
        experiment_id = use_experiment(mlflow, header["experiment"])
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(experiment_id, header["start_time"], header["tags"], run_name=stage).info.run_id
        run = Tracker(client, run_id, header)
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri)
            monitor.start()
    except Exception as e:  # noqa: BLE001
        failure = redacted(f"MLflow tracking store {uri} unreachable: {e}", uri)
        if required:
            raise TrackingUnavailable(failure) from None
        run = Tracker(header=header, spool=Spool.create(header))
        warnings.warn(f"{failure}; stage {stage} spools its run to {run.spool.folder} ({SYNC})", stacklevel=3)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if monitor is not None:
            monitor.finish()
        run.end(status)
        where = f"spooled to {run.spool.folder}" if run.spool else f"MLflow run {run.run_id}"
        log.info("%s %s: %s", stage, status.lower(), where)


def helper_answer(helper: subprocess.Popen) -> dict:
    """The next JSON object a helper process prints (a library may print other lines too)."""
    for line in helper.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "the MLflow helper process ended without an answer"}


class ForwardingTracker(Tracker):
    """The stage's side of a run a StageRunProcess keeps: each call goes to the helper as a JSON line."""

    def __init__(self, helper: "StageRunProcess", header: dict):
        super().__init__(header=header)
        self._helper = helper

    def _send(self, call: str, **kwargs) -> None:
        self._helper.send({"call": call, **kwargs})


class StageFailed(Exception):
    """The stage a helper keeps the run of failed or died: the run ends FAILED."""


class StageRunProcess:
    """stage_run's run kept by a helper process (`python -m stages.tracking stage-run`). Started before the stage
    imports its libraries, it imports MLflow and opens the run on another core meanwhile, and it takes the
    stage's calls (a Tracker, `tracker`) without the stage waiting for the store. The stage waits for it only
    where it must: `with` waits for the run to open under `required`, and its end for the run to be ended. A
    stage that dies closes the helper's input: the run ends FAILED."""

    def __init__(
        self,
        stage: str,
        experiment: str,
        params: dict,
        inputs: list[str | Path],
        system_metrics: bool = False,
        required: bool = False,
    ):
        header, hashes = run_header(stage, experiment, inputs)
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "stages.tracking", "stage-run"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._required, self._lost = required, False
        self.send({"header": header, "system_metrics": system_metrics, "required": required})
        self.tracker = ForwardingTracker(self, header)
        self.tracker.log_params(params)
        self.tracker.log_inputs(hashes, context=stage)

    def send(self, message: dict) -> None:
        try:
            self._helper.stdin.write(json.dumps(message) + "\n")
            self._helper.stdin.flush()
        except OSError:  # the helper died: tracking must not stop the stage
            if not self._lost:
                warnings.warn("the MLflow helper process ended; the rest of the run is not tracked", stacklevel=3)
            self._lost = True

    def _receive(self) -> dict:
        return helper_answer(self._helper)

    def __enter__(self) -> Tracker:
        if self._required and "error" in (answer := self._receive()):
            self._helper.wait()
            raise TrackingUnavailable(answer["error"])
        return self.tracker

    def __exit__(self, exc_type, exc, tb) -> None:
        self.send({"status": "FINISHED" if exc_type is None else "FAILED"})
        with contextlib.suppress(OSError):
            self._helper.stdin.close()
        self._helper.wait()


def _serve_stage_run() -> None:
    """The helper process of StageRunProcess, speaking JSON lines: reads {"header", "system_metrics",
    "required"} and opens the run, under `required` printing {"opened"} (or {"error"}: the store is out of
    reach) for the stage waiting on it; then applies each {"call", ...} in order until {"status"} ends the run,
    or FAILED when its input closes."""
    start = json.loads(sys.stdin.readline())
    try:
        with opened_run(start["header"], start["system_metrics"], start["required"]) as run:
            if start["required"]:
                print(json.dumps({"opened": run.run_id}), flush=True)
            for line in sys.stdin:
                message = json.loads(line)
                if "status" in message:
                    if message["status"] != "FINISHED":
                        raise StageFailed
                    return
                run._send(message.pop("call"), **message)
            raise StageFailed
    except TrackingUnavailable as e:
        print(json.dumps({"error": str(e)}), flush=True)
    except StageFailed:
        pass


def _replay(client, spool: Spool, root: Path | None) -> str:
    """Replay one spooled run into its run on the store (made anew if it never got one), then end it as the
    stage did (FAILED if the stage died while spooling); returns the run id. Replaying twice logs nothing twice:
    MLflow drops a metric it already holds, and a model version is not registered again."""
    import mlflow

    header = io.read_json(spool.folder / "run.json")
    run_id = header.get("run_id")
    if run_id is None:
        experiment_id = use_experiment(mlflow, header["experiment"], root)
        tags = header["tags"] | {"spooled": "true"}
        if "mlflow.parentRunId" not in tags and "pipeline_token" in tags:  # the flow's run ended before the replay
            flow_runs = client.search_runs([experiment_id], f"tags.flow_token = '{tags['pipeline_token']}'")
            tags |= {"mlflow.parentRunId": flow_runs[0].info.run_id} if flow_runs else {}
        run_id = client.create_run(experiment_id, header["start_time"], tags, run_name=header["run_name"]).info.run_id
        io.write_json(spool.folder / "run.json", header | {"run_id": run_id})
    else:
        client.set_tag(run_id, "spooled", "true")
    calls = spool.calls()
    if not calls or calls[-1]["call"] != "end":
        calls.append({"call": "end", "status": "FAILED", "end_time": int(time.time() * 1000)})
    Tracker(client, run_id).replay(calls)
    return run_id


def sync(root: Path | None = None) -> list[str]:
    """Replay every spooled run whose stage has stopped into the tracking store, removing each one replayed;
    returns their run ids. A run still being spooled is left for later."""
    import fasteners
    import mlflow

    folders = sorted(p.parent for p in spool_root(root).glob("*/run.json"))
    if not folders:
        return []
    uri = tracking_uri(root)
    _probe(uri)
    mlflow.set_tracking_uri(uri)
    client, replayed = mlflow.MlflowClient(uri), []
    for folder in folders:
        writing = fasteners.InterProcessLock(folder / "writing.lock")
        if not writing.acquire(blocking=False):
            continue  # its stage still runs
        try:
            if (folder / "run.json").exists():  # else another sync replayed it meanwhile
                replayed.append(_replay(client, Spool(folder), root))
                log.info("replayed the spooled run %s as MLflow run %s", folder.name, replayed[-1])
        finally:
            writing.release()
        shutil.rmtree(folder)
    return replayed


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
    """The helper process of PipelineRun, speaking JSON lines: prints {"run_id"}, replays the runs spooled
    since the last flow run, reads {"cached"}, prints the stage links, reads {"metrics"} to log on the run, reads
    {"status"}, ends the run and prints {"ended"}."""
    uri = tracking_uri(root)
    try:
        import mlflow

        _probe(uri)
        experiment_id = use_experiment(mlflow, experiment, root)
        client = mlflow.MlflowClient()
        tags = {"stage": "pipeline", "git_commit": git_commit(root), "flow_token": token}
        run_id = client.create_run(experiment_id, run_name="pipeline", tags=tags).info.run_id
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": redacted(f"MLflow unavailable ({uri}): {e}", uri)}), flush=True)
        return
    print(json.dumps({"run_id": run_id}), flush=True)
    try:
        sync(root)
    except Exception as e:  # noqa: BLE001 - the spool stays for the next try
        log.warning("%s", redacted(f"replaying the spooled MLflow runs failed: {e}", uri))
    status = "FAILED"
    try:
        for line in sys.stdin:
            message = json.loads(line)
            if "cached" in message:
                links = _mark_cached(client, experiment_id, run_id, token, message["cached"], root)
                print(json.dumps(links), flush=True)
            elif "metrics" in message:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in message["metrics"].items()])
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
            [sys.executable, "-m", "stages.tracking", "parent-run", experiment, str(root), self._token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._run_id: str | None = None
        self._opened = threading.Thread(target=self._await_run, daemon=True)
        self._opened.start()

    def _receive(self) -> dict:
        return helper_answer(self._helper)

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

    def log_metrics(self, metrics: dict) -> None:
        """Log numeric metrics ({"a": {"b": 1}} as a.b) on the parent run."""
        numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        if numeric and self._open() is not None:
            with contextlib.suppress(OSError):
                self._send({"metrics": numeric})

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


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("sync", help="replay the runs spooled while the tracking store was out of reach")
    replay.add_argument("--root", type=Path, default=None, help="the repo (default: here)")
    show = commands.add_parser("views", help="links to the MLflow UI views that compare the newest evaluation")
    show.add_argument("--experiment", default="llm-pipeline")
    helper = commands.add_parser("parent-run", help="(internal) a pipeline flow's parent run")
    for arg in ("experiment", "root", "token"):
        helper.add_argument(arg)
    commands.add_parser("stage-run", help="(internal) a stage's run, its calls read from stdin")
    args = parser.parse_args()
    if args.command in ("stage-run", "parent-run"):
        # a helper ends when its input closes, ending the run FAILED if the stage or flow died: a signal to their
        # process group (Ctrl-C, a flow stopping its stages) must not take the run's record down with them
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.command == "stage-run":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        _serve_stage_run()
        return
    if args.command == "parent-run":
        _serve_parent_run(args.experiment, Path(args.root), args.token)
        return
    if args.command == "views":
        for what, link in views(args.experiment).items():
            print(f"{what}:\n  {link}")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uri = tracking_uri(args.root)
    try:
        replayed = sync(args.root)
    except Exception as e:  # noqa: BLE001 - one line, the spool stays
        raise SystemExit(redacted(f"sync failed, the spool stays in {spool_root(args.root)}: {e}", uri)) from None
    print(f"{len(replayed)} spooled run(s) replayed to {redacted(uri, uri)}")


if __name__ == "__main__":
    main()
