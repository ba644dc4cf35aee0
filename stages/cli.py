"""What every stage's command does around its run(params, tracker): load params, open the MLflow run with the
inputs, params and outputs dvc.yaml declares for the stage, write and log its metrics, register its models."""

import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from lm import io
from stages import cost, dvcfile
from stages.config import ConfigError, Params, as_dict, load_params
from stages.tracking import NO_TRACKING, StageRunProcess, Tracker, TrackingUnavailable

log = logging.getLogger("stages")

Run = Callable[[Params, Tracker], dict | None]


def is_global_zero() -> bool:
    """Rank zero of a distributed launch (torchrun sets RANK; srun SLURM_PROCID; Lightning's launcher sets
    NODE_RANK and LOCAL_RANK for the processes it starts), or a plain run."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


FLOW_PID = "PIPELINE_FLOW_PID"
"""Set by the Prefect flow for the stage commands it starts: the flow's process id."""


def end_with_flow() -> None:
    """A stage command that a flow run started ends when the flow's process does: a killed flow cannot stop its
    children, and a stage left running would race the next flow run for the same outputs."""
    if FLOW_PID not in os.environ:
        return
    try:
        flow = psutil.Process(int(os.environ[FLOW_PID]))
    except psutil.NoSuchProcess:
        flow = None

    def watch() -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            while flow and flow.is_running() and flow.status() != psutil.STATUS_ZOMBIE:  # is_running: not a reused pid
                time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-flow", daemon=True).start()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def forks_end_with_the_stage() -> None:
    """A process the stage forks (datatrove's multiprocess Manager, a fork pool's workers) is killed when the
    stage's process ends (Linux): a killed stage cannot stop them, and they would hold its output pipes (and so a
    `dvc repro | tee`) open for good."""
    if sys.platform != "linux":
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    os.register_at_fork(after_in_child=lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_memory() -> None:
    """glibc hands every large freed block (activations, logits, gradients) back to the kernel and maps it anew,
    zero-filled, on the next step: a CPU training step then spends much of its time in the kernel. Keeping freed
    memory in the process for reuse ends that churn."""
    libc = ctypes.CDLL(None)
    if sys.platform == "linux" and hasattr(libc, "mallopt"):  # glibc
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def exit_now() -> None:
    """End the finished stage's process without the interpreter's teardown, which takes seconds once torch and
    Lightning are loaded and does nothing a stage needs: its outputs are written and its MLflow run is ended.
    A process with children still running (a launcher's other ranks) exits the usual way."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if not psutil.Process().children():
        os._exit(0)


def stage_name(run: Run) -> str:
    """A run()'s stage: the name of its module (also under `python -m stages.<name>`, where it is __main__)."""
    return sys.modules[run.__module__].__spec__.name.rpartition(".")[2]


def track(load_run: Callable[[], Run], params: Params, tree: dict, stage: dvcfile.Stage, meter: cost.Meter) -> None:
    """run() inside the stage's MLflow run: its params and inputs, then its metrics, its cost, artifacts and
    models. The run opens in a helper process while load_run() imports the stage."""
    name = stage.name
    experiment = params.run.experiment
    logged = {key: dvcfile.value_at(tree, key) for key in stage.params}  # as parsed
    required = params.run.tracking == "required"
    mlflow_run = StageRunProcess(name, experiment, logged, list(stage.deps), True, required)
    run = load_run()
    with mlflow_run as tracker:
        metrics = run(params, tracker)
        spent = meter.finish(metrics)
        metrics = cost.without_phases(metrics)
        metrics_file = Path(params.paths.metrics) / f"{name}.json"
        io.write_json(metrics_file, metrics)
        tracker.log_metrics(metrics)
        cost.record(name, spent, list(dvcfile.stages(tree)), params.paths)
        tracker.log_metrics({"cost": {k: v for k, v in spent.items() if not k.endswith("_at")}})
        for path in dict.fromkeys([metrics_file, *stage.artifacts()]):
            tracker.log_artifact(path)
        for model, model_dir in params.models().items():
            if stage.writes(model_dir):
                tracker.register_model(model_dir, experiment, model, params.model_tags(model))


def main(run: Run) -> None:
    """`python -m stages.<name>`: the stage's command, its module imported first."""
    launch(stage_name(run), lambda: run)


def launch(name: str, load_run: Callable[[], Run]) -> None:
    """The stage's command, as dvc.yaml runs it (`python -m stages <name>`: load_run imports the stage after its
    MLflow run has started opening). Expected failures (bad params, bad data) exit 1 with one clear line, not a
    traceback. A stage that runs every time (always_changed) opens no MLflow run: it would add one per repro."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    meter = cost.Meter()
    keep_freed_memory()
    forks_end_with_the_stage()
    end_with_flow()
    try:
        params = load_params()
        tree = as_dict(params)
        stage = dvcfile.stages(tree)[name]
        if not is_global_zero():
            load_run()(params, NO_TRACKING)  # other ranks train with rank zero, which tracks and writes
        elif stage.always_changed:
            spent = meter.finish(load_run()(params, NO_TRACKING))
            cost.record(name, spent, list(dvcfile.stages(tree)), params.paths)
        else:
            track(load_run, params, tree, stage, meter)
    except (ConfigError, io.DataError, TrackingUnavailable) as e:
        log.error("%s failed: %s", name, e)
        sys.exit(1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(e):
            raise
        # the outputs are written beside their place and renamed in at the end: the previous ones are untouched
        log.error("%s failed: no space left on the device writing %s", name, e.filename or "its outputs")
        sys.exit(1)
    exit_now()
