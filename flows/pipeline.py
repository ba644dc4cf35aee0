"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in DAG order, each running `dvc repro` for it.

Tasks come from dvc.yaml itself, so a stage added there needs no change here. DVC decides what is stale;
Prefect adds the run history, logs and schedules. Run once (Prefect starts a temporary local server when no
PREFECT_API_URL is set):

    python -m flows.pipeline
"""

import subprocess
import sys
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task


def stage_order(repo: str | Path = ".") -> list[str]:
    """The stages of dvc.yaml, every stage after the ones it depends on."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        return [stage.name for stage in nx.topological_sort(graph.reverse(copy=False))]


@task(task_run_name="{stage}")
def repro_stage(stage: str, repo: str) -> str:
    """`dvc repro --single-item <stage>`: runs the stage only if DVC finds it stale; streams its log."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info(line.rstrip())
    if proc.wait():
        tail = "\n".join(lines[-20:])
        raise RuntimeError(f"stage {stage} failed (dvc repro exit {proc.returncode}):\n{tail}")
    return "\n".join(lines)


@flow(name="pipeline")
def pipeline(repo: str = ".") -> list[str]:
    """Reproduce every stage of the DVC pipeline in `repo`; returns the stages in the order they ran."""
    repo = str(Path(repo).resolve())
    order = stage_order(repo)
    for stage in order:
        repro_stage(stage, repo)
    return order


if __name__ == "__main__":
    pipeline()
