"""`python -m stages <stage>`: what dvc.yaml runs. The stage's MLflow run starts opening in a helper process
before the stage's module (torch, Lightning) is imported, so MLflow's start-up runs on another core meanwhile;
`python -m stages.<stage>` runs the same stage with its imports first."""

import importlib
import sys

from stages import cli
from stages.dvcfile import stage_names

if __name__ == "__main__":
    names = stage_names()
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m stages <stage>, one of {', '.join(names)}")
    name = sys.argv[1]
    cli.launch(name, lambda: importlib.import_module(f"stages.{name}").run)
