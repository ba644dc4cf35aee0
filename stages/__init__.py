"""The verbs: one module per dvc.yaml stage, named as the stage, each a `run(params, tracker) -> metrics` that DVC
runs as `python -m stages <name>` (stages/__main__.py; `python -m stages.<name>` too), the tests call, and the
Prefect flow runs through DVC. Besides them: the framework every stage shares (cli, config, dvcfile, tracking),
which computes nothing. A stage imports lm/ and that framework, never another stage."""

import importlib
import os
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TELEMETRY = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
"""Kept off wherever a stage or flow starts (dvc repro, python -m flows.recipe, not only make): no traffic beyond
the loopback, the Prefect server a flow starts included (its processes inherit this environment)."""
for _key, _value in NO_TELEMETRY.items():
    os.environ.setdefault(_key, _value)


def registry(root: str | Path = ROOT) -> dict[str, Callable]:
    """Each dvc.yaml stage's run(params, tracker), in dvc.yaml's order (every stage after those it reads)."""
    from stages.dvcfile import stage_names

    return {name: importlib.import_module(f"stages.{name}").run for name in stage_names(root)}
