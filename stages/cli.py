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
from stages import dvcfile
from stages.config import ConfigError, Params, as_dict, load_params
from stages.tracking import NO_TRACKING, Tracker, TrackingUnavailable, stage_run

log = logging.getLogger("stages")

Run = Callable[[Params, Tracker], dict | None]


def is_global_zero() -> bool:
    """Rank zero of a distributed launch (torchrun sets RANK; Lightning's launcher sets NODE_RANK and LOCAL_RANK
    for the processes it starts), or a plain run."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
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


def stage_name(run: Run) -> str:
    """A run()'s stage: the name of its module (also under `python -m stages.<name>`, where it is __main__)."""
    return sys.modules[run.__module__].__spec__.name.rpartition(".")[2]


def main(run: Run) -> None:
    """The stage's command, as dvc.yaml runs it. Expected failures (bad params, bad data) exit 1 with one clear
    line, not a traceback. A stage that runs every time (always_changed) opens no MLflow run: it would add one
    per repro."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    name = stage_name(run)
    forks_end_with_the_stage()
    end_with_flow()
    try:
        params = load_params()
        tree = as_dict(params)
        stage = dvcfile.stages(tree)[name]
        if stage.always_changed or not is_global_zero():
            run(params, NO_TRACKING)  # other ranks train with rank zero, which tracks and writes
            return
        experiment = params.run.experiment
        logged = {key: dvcfile.value_at(tree, key) for key in stage.params}  # as parsed
        required = params.run.tracking == "required"
        with stage_run(name, experiment, logged, list(stage.deps), True, required) as tracker:
            metrics = run(params, tracker)
            metrics_file = Path(params.paths.metrics) / f"{name}.json"
            io.write_json(metrics_file, metrics)
            tracker.log_metrics(metrics)
            for path in dict.fromkeys([metrics_file, *stage.artifacts()]):
                tracker.log_artifact(path)
            for model, model_dir in params.models().items():
                if stage.writes(model_dir):
                    tracker.register_model(model_dir, experiment, model, params.model_tags(model))
    except (ConfigError, io.DataError, TrackingUnavailable) as e:
        log.error("%s failed: %s", name, e)
        sys.exit(1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(e):
            raise
        # the outputs are written beside their place and renamed in at the end: the previous ones are untouched
        log.error("%s failed: no space left on the device writing %s", name, e.filename or "its outputs")
        sys.exit(1)
