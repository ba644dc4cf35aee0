"""The shared body of every stage's main(): load params, open the MLflow run, write the stage's metrics."""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from stages import io
from stages.config import ConfigError, Params, Paths, as_dict, load_params
from stages.tracking import StageRun, stage_run

log = logging.getLogger("stages")


def is_global_zero() -> bool:
    """Rank zero of a distributed launch (torchrun sets RANK; Lightning's launcher sets NODE_RANK and LOCAL_RANK
    for the processes it starts), or a plain run."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def stage_main(
    stage: str,
    body: Callable[[Params, StageRun], dict | None],
    inputs: Callable[[Paths], list[str]],
    artifacts: Callable[[Paths], list[str]] = lambda paths: [],
    models: Callable[[Params], list[str]] = lambda params: [],
    system_metrics: bool = False,
    section: str | None = None,
) -> None:
    """Run `body` for `stage` as DVC calls it, logging `inputs`' DVC hashes and `artifacts` to MLflow, and
    registering each of the `models` it makes (names of Params.models()) as a version of the registered
    model named after the experiment.
    system_metrics: sample CPU/GPU/memory use during the run (for the long, training stages).
    section: the params.yaml section the stage reads, when not named after it.

    Expected failures (bad params, bad data) exit 1 with one clear line, not a traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    try:
        params = load_params()
        if not is_global_zero():
            body(params, StageRun(None))  # trains with the others; rank zero tracks and writes
            return
        section = section or stage
        logged = {section: as_dict(getattr(params, section)), "run": as_dict(params.run)}
        experiment = params.run.experiment
        with stage_run(stage, experiment, logged, inputs(params.paths), system_metrics) as tracker:
            metrics = body(params, tracker)
            metrics_file = Path(params.paths.metrics) / f"{stage}.json"
            io.write_json(metrics_file, metrics)
            tracker.log_metrics(metrics)
            for path in [metrics_file, *artifacts(params.paths)]:
                tracker.log_artifact(path)
            for model in models(params):
                tracker.register_model(params.models()[model], experiment, model)
    except (ConfigError, io.DataError) as e:
        log.error("%s failed: %s", stage, e)
        sys.exit(1)
