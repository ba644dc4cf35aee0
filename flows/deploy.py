"""Serve the pipeline flow as a deployment on the schedule in params.yaml (run.schedule_cron or
run.schedule_interval_s). Each run brings the pipeline up to date: DVC reruns what changed since the last.

python -m flows.deploy          # needs a Prefect server: `prefect server start`, then
                                # `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`

For a work pool instead of this serving process, see prefect.yaml (`prefect deploy`)."""

from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import pipeline
from stages.config import load_params

DEPLOYMENT = "scheduled"
# a run due while the last is still going is cancelled, not queued: the next one brings everything up to date,
# and two runs in one repo would contend for DVC's lock
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployment(repo: str | Path = "."):
    repo = Path(repo).resolve()
    run = load_params(repo / "params.yaml").run
    schedule = {"interval": run.schedule_interval_s} if run.schedule_interval_s else {"cron": run.schedule_cron}
    return pipeline.to_deployment(
        name=DEPLOYMENT, parameters={"repo": str(repo)}, concurrency_limit=ONE_AT_A_TIME, **schedule
    )


if __name__ == "__main__":
    from prefect import serve

    from flows.server import require_api

    require_api()
    serve(deployment())
