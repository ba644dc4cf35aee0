"""The pipeline as a Prefect flow: one task per dvc.yaml stage, each waiting only for the stages it depends on.

Tasks come from dvc.yaml itself, so a stage added there needs no change here. DVC decides what is stale and
records what ran (dvc.lock, cache); Prefect runs independent stages at once, retries failed ones (run.retries),
keeps each stage's log, and ends with a markdown artifact: the metrics table, the MLflow runs, the dvc.lock hash.
A flow run holds DVC's locks from start to end (the repo lock, and read and write locks on every stage's paths):
a second flow run, or a `dvc repro`, in the same workspace stops at once, and a killed flow's locks die with it
(its stage command too). One of Prefect's global concurrency limits holds across flow runs, processes and
workers: at most run.max_concurrency stage commands at once on a machine.
Every MLflow stage run is nested under one parent run per flow run; a stage DVC skipped as cached gets a run
marked cached that links the run which made its outputs.

    python -m flows.pipeline      # a temporary local Prefect server is started when no PREFECT_API_URL is set
"""

import contextlib
import dataclasses
import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import networkx as nx
from dvc.env import DVC_ROOT, DVC_STAGE
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner

from flows.interpreter import env_with_interpreter
from lm import io
from stages import tracking
from stages.cli import FLOW_PID
from stages.config import load_params


class DvcRepo:
    """DVC's Python API on one repo, opened once for a flow run, one call at a time (DVC's repo lock is not
    re-entrant across threads) and from inside the repo (DVC resolves stage names and paths against the working
    directory). Each call starts from fresh caches, as DVC's own locked calls do, so status and commit see what
    the stages wrote."""

    def __init__(self, root: str | Path):
        from dvc.repo import Repo

        self.root, self._lock = Path(root), threading.Lock()
        with contextlib.chdir(self.root):
            self._repo = Repo(".")

    @contextlib.contextmanager
    def _call(self):
        with self._lock, contextlib.chdir(self.root):
            self._repo._reset()  # what lock_repo does on taking the lock, which the flow holds throughout
            yield self._repo

    @contextlib.contextmanager
    def locked(self):
        """DVC's locks for the block: the repo lock, as `dvc repro` holds it between stage commands, and DVC's
        read and write locks on every stage's inputs and outputs, as `dvc repro` holds them on a running stage's.
        So a `dvc repro` or another flow run on the workspace stops at once meanwhile, and this stops at once
        when one runs; the locks die with the process."""
        from dvc.lock import LockError
        from dvc.repo import lock_repo
        from dvc.rwlock import rwlock

        with contextlib.ExitStack() as stack:
            try:
                with self._call() as dvc:
                    stack.enter_context(lock_repo(dvc))
                    stages = dvc.index.stages
                    read = [dep.fs_path for stage in stages for dep in stage.deps]
                    write = [out.fs_path for stage in stages for out in stage.outs]
                    hardlink = dvc.config["core"].get("hardlink_lock", False)
                    # as DVC names its own holder: its calls from this process then pass
                    stack.enter_context(rwlock(dvc.tmp_dir, dvc.fs, " ".join(sys.argv), read, write, hardlink))
            except LockError as e:
                said = " ".join(str(e).split("If there are no processes")[0].split())
                raise RuntimeError(f"{self.root} is busy: {said}; this flow run stops before any stage work") from None
            yield

    def close(self) -> None:
        self._repo.close()

    def graph(self) -> dict[str, list[str]]:
        """Each dvc.yaml stage -> the stages it depends on, every stage after its dependencies."""
        with self._call() as dvc:
            graph = dvc.index.graph  # edges point from a stage to the stages it depends on
            order = nx.topological_sort(graph.reverse(copy=False))
            return {stage.name: sorted(dep.name for dep in graph.successors(stage)) for stage in order}

    def stale(self, stages: list[str] | None = None) -> set[str]:
        with self._call() as dvc:
            return {key.rsplit(":", 1)[-1] for key in dvc.status(targets=stages)}

    def command(self, stage: str) -> str:
        with self._call() as dvc:
            return dvc.stage.collect(stage)[0].cmd

    def commit(self, stage: str) -> None:
        """Record the stage's outputs in dvc.lock, the cache and the run-cache."""
        with self._call() as dvc:
            dvc.commit(stage, force=True)

    def default_remote(self) -> tuple[str | None, str | None]:
        """The default remote's name and URL, if one is configured."""
        with self._call() as dvc:
            name = dvc.config["core"].get("remote")
            return name, dvc.config["remote"][name]["url"] if name else None

    def check_remote(self) -> None:
        """Raise unless the default remote can be read: its folder, or the bucket or folder it is to be made in,
        lists. DVC itself takes a missing bucket for an empty remote."""
        with self._call() as dvc:
            remote = dvc.cloud.get_remote()
            fs, path = remote.fs, remote.path
            if not fs.exists(path):
                path = fs.parent(path) if fs.protocol == "local" else fs.parts(path)[0]
            fs.ls(path)

    def pull_run_cache(self) -> None:
        """Every run-cache entry the default remote holds (small files: which deps and params made which outputs)."""
        with self._call() as dvc:
            dvc.stage_cache.pull(None)

    def restore(self, stage: str, pull: bool) -> bool:
        """What `dvc repro` does before running a stale stage: when the run-cache holds a run of it on these deps,
        params and command, check its outputs out (pulled from the default remote if `pull`) and record them;
        returns whether it did."""
        from dvc.repo import lock_repo
        from dvc.stage.cache import RunCacheNotFoundError, _can_hash
        from dvc_data.hashfile.hash_info import HashInfo

        with self._call() as dvc, lock_repo(dvc):
            probe = dvc.stage.collect(stage)[0]
            if not _can_hash(probe):  # never in the run-cache (a stage that always runs)
                return False
            probe.save_deps()  # hashes of the inputs as they are now (restore() decides on a fresh stage)
            run = dvc.stage_cache._load(probe)  # the run-cache entry: which outputs these inputs made
            if not run:
                return False
            if pull:  # DVC pulls a run's cached outputs only, not its metrics and plots (push() sends those)
                dvc.cloud.pull([HashInfo("md5", out["md5"]) for out in run["outs"] if "md5" in out])
            target = dvc.stage.collect(stage)[0]
            target.remove_outs(ignore_remove=False, force=False)  # as before a run: the run's outputs replace them
            try:
                dvc.stage_cache.restore(target, pull=pull)
            except RunCacheNotFoundError:
                return False
            dvc.commit(stage, force=True)
        return True

    def push(self, stage: str) -> None:
        """The stage's outputs and the run-cache to the default remote, metrics and plots included: `dvc push`
        sends cached outputs only, and without the others no other machine can restore the run."""
        with self._call() as dvc:
            dvc.push(targets=[stage], run_cache=True)
            uncached = [out.hash_info for out in dvc.stage.collect(stage)[0].outs if not out.use_cache]
            dvc.cloud.push([h for h in uncached if h])


@contextlib.contextmanager
def dvc_repo(root: str | Path, locked: bool = False):
    repo = DvcRepo(root)
    try:
        with repo.locked() if locked else contextlib.nullcontext():
            yield repo
    finally:
        repo.close()


def stage_graph(root: str | Path = ".") -> dict[str, list[str]]:
    with dvc_repo(root) as dvc:
        return dvc.graph()


def failure_line(lines: list[str]) -> str:
    """The line that says why: a stage's own "<stage> failed: ..." error, else the traceback's last line."""
    said = [line for line in lines if " failed: " in line]
    return (said or [line for line in lines if line.strip()] or ["(no output)"])[-1].strip()


@dataclasses.dataclass(frozen=True)
class Remote:
    name: str | None
    """The default DVC remote, if one is configured."""
    url: str | None
    push: bool
    """Push each stage that ran (run.push, and a remote to push to)."""


class StageCommands:
    """The stage commands a flow run has running, each the leader of a process group of its own. A flow run that
    fails, or is stopped early (the runner's SIGTERM on cancellation or shutdown, Ctrl-C), stops them and retries
    none: its task threads wait on their output, so until they ended its process could not exit, and the runner
    killed it (and freed DVC's lock) only after its 30 s grace."""

    def __init__(self):
        self._running, self._lock, self.stopping = set(), threading.Lock(), False

    @contextlib.contextmanager
    def started(self, cmd: str, **popen):
        with self._lock:
            if self.stopping:
                raise RuntimeError("the flow run is stopping: no new stage starts")
            proc = subprocess.Popen(cmd, shell=True, start_new_session=True, **popen)
            self._running.add(proc)
        try:
            yield proc
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)


STAGE_SLOT_LEASE_S = 60  # a killed flow's slot returns within this (renewed every 3/4 of it while held)


def stage_limit(slots: int) -> str:
    """The Prefect global concurrency limit on this machine's stage commands, set to `slots` (the last flow run
    to start sets it); returns its name."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    name = f"llm-pipeline-stages-{socket.gethostname()}"
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, slots)
        except ObjectAlreadyExists:  # another flow run created it at the same moment
            client.upsert_global_concurrency_limit_by_name(name, slots)
    return name


@task(task_run_name="{stage}", cache_policy=NO_CACHE)  # DVC is the cache
def repro_stage(
    stage: str,
    dvc: DvcRepo,
    stale_at_start: bool,
    upstream: list[str],
    slots: str,
    parent,
    remote: Remote,
    commands: StageCommands,
) -> str:
    """What `dvc repro --single-item <stage>` does, under the locks the flow run holds (so independent stages
    run at once): skip if DVC finds the stage current; restore it from the run-cache if that
    holds this run; else run its command, streaming the log, have DVC record the result in dvc.lock, the cache
    and the run-cache, and push them to the default remote. Returns "ran", "restored" or "up to date"."""
    logger = get_run_logger()
    # a stage stale at the start stays stale; one that was not becomes stale only if something upstream changed
    changed_upstream = any(status != "up to date" for status in upstream)
    if not stale_at_start and not (changed_upstream and dvc.stale([stage])):
        logger.info("%s is up to date: DVC skips it", stage)
        return "up to date"
    if dvc.restore(stage, pull=remote.name is not None):
        logger.info("%s restored from DVC's run-cache: a run on these inputs and params made its outputs", stage)
        return "restored"
    # the command ends if this process is killed; its environment as `dvc repro` makes it (DVC_ROOT, DVC_STAGE),
    # nested under the flow's run
    cmd, dvc_env = dvc.command(stage), {DVC_ROOT: str(dvc.root), DVC_STAGE: stage}
    env = env_with_interpreter(os.environ | parent.env() | dvc_env | {FLOW_PID: str(os.getpid())})
    # one of this machine's slots; a stage goes on if the server misses a renewal (the slot may then be lent twice)
    with concurrency(slots, lease_duration=STAGE_SLOT_LEASE_S, strict=True, raise_on_lease_renewal_failure=False):
        logger.info("running %s: %s", stage, cmd)
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        with commands.started(cmd, cwd=dvc.root, env=env, **output) as proc:
            lines = []
            for line in proc.stdout:
                lines.append(line.rstrip())
                logger.info(line.rstrip())
            proc.wait()
        if proc.returncode:
            tail = "\n".join(lines[-20:])
            raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {failure_line(lines)}\n{tail}")
    dvc.commit(stage)
    if remote.push:
        dvc.push(stage)
        logger.info("%s pushed to DVC remote %s", stage, remote.name)
    return "ran"


def first_table(markdown: Path) -> list[str]:
    lines = markdown.read_text().splitlines() if markdown.exists() else []
    return list(itertools.takewhile(str.strip, itertools.dropwhile(lambda line: not line.startswith("|"), lines)))


def report(repo: Path, reports: Path, ran: dict[str, str], runs: dict[str, str]) -> str:
    """The flow's closing markdown: what ran, the MLflow runs, the dvc.lock hash, evaluate's table and the cost
    ledger's (from their reports in `reports`)."""
    lock_hash = hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    lines = [
        "# Pipeline run",
        "",
        f"dvc.lock sha256: `{lock_hash}`",
        "",
        "| stage | ran | MLflow run |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {r} | {runs.get(s, '')} |" for s, r in ran.items()]
    if evaluation := first_table(reports / "evaluate.md"):  # one row per model
        lines += ["", *evaluation]
    if ledger := first_table(reports / "ledger.md"):
        lines += ["", "What each stage cost on its last run:", "", *ledger]
    return "\n".join(lines)


@flow(name="pipeline", task_runner=ThreadPoolTaskRunner(max_workers=8))
def pipeline(repo: str = ".") -> dict[str, str]:
    """Bring every stage of the DVC pipeline in `repo` up to date; returns {stage: "ran", "restored" from the
    run-cache, or "up to date"}."""
    repo_path = Path(repo).resolve()
    params = load_params(repo_path / "params.yaml")
    slots = stage_limit(params.run.max_concurrency)
    # the MLflow helper process starts up on the other core while DVC reads the pipeline here
    with (
        dvc_repo(repo_path, locked=True) as dvc,
        tracking.pipeline_run(params.run.experiment, repo_path) as parent,
    ):
        graph, stale = dvc.graph(), dvc.stale()
        name, url = dvc.default_remote()
        remote = Remote(name, url, bool(name) and params.run.push)
        if remote.name:
            try:  # what teammates pushed: their runs are restored, not recomputed
                dvc.check_remote()
                dvc.pull_run_cache()
            except Exception as e:  # noqa: BLE001 - any failure of the remote, before any stage work
                # S3 answers a HEAD with a bad key by a bare 403, which s3fs raises as PermissionError("Forbidden")
                failed = "access denied, check its credentials" if isinstance(e, PermissionError) else "cannot read it"
                raise RuntimeError(f"DVC remote {remote.name!r} ({remote.url}): {failed}: {e}") from None
        retries = {"retries": params.run.retries, "retry_delay_seconds": params.run.retry_delay_s}
        commands = StageCommands()
        task_run = repro_stage.with_options(**retries, retry_condition_fn=lambda *_: not commands.stopping)
        futures = {}
        for stage, upstream in graph.items():
            ran_upstream = [futures[u] for u in upstream if u in futures]
            if stage in stale or ran_upstream:  # else DVC would skip it, so no task for it
                args = (stage, dvc, stage in stale, ran_upstream, slots, parent, remote, commands)
                futures[stage] = task_run.submit(*args)
        get_run_logger().info("up to date, skipped: %s", ", ".join(s for s in graph if s not in futures) or "none")
        try:
            # in DAG order: the first failure is the stage's own error
            ran = {stage: futures[stage].result() if stage in futures else "up to date" for stage in graph}
        except BaseException:  # a failed stage, or the flow run stopped (TerminationSignal, KeyboardInterrupt)
            commands.stop()
            raise
        runs = parent.mark_cached([s for s, r in ran.items() if r != "ran"])
        ledger = repo_path / params.paths.metrics / "ledger.json"
        if ledger.exists():  # the flow's totals: what the stages it ran cost
            parent.log_metrics({"cost": io.read_json(ledger)["this_run"]})
    reports = repo_path / params.paths.reports
    create_markdown_artifact(
        report(repo_path, reports, ran, runs), key="pipeline-report", description="metrics and lineage"
    )
    return ran


if __name__ == "__main__":
    from flows.server import require_api

    require_api()
    pipeline()
