"""Serve the pipeline flow as a deployment on the cron schedule in params.yaml (run.schedule_cron).

python -m flows.deploy          # needs a Prefect server: `prefect server start`, then
                                # `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`
"""

from pathlib import Path

from flows.pipeline import pipeline
from stages.config import load_params

DEPLOYMENT = "scheduled"


def deployment(repo: str | Path = "."):
    repo = Path(repo).resolve()
    cron = load_params(repo / "params.yaml").run.schedule_cron
    return pipeline.to_deployment(name=DEPLOYMENT, cron=cron, parameters={"repo": str(repo)})


if __name__ == "__main__":
    from prefect import serve

    serve(deployment())
