"""A sweep as a Prefect flow: every combination of params.yaml's `sweep.grid` queued as a DVC experiment, run
by DVC's queue with `sweep.jobs` workers at once, and compared in one table.

Each experiment runs in a temporary copy of the repo (DVC restores unchanged stages from its cache), logs its
stage runs to the repo's MLflow store tagged `dvc_experiment=<name>`, and is kept by DVC as an experiment:
`dvc exp show`, `dvc exp apply <name>`, `dvc plots diff <names>`. A grid point's name comes from its values,
so a rerun of the sweep on the same commit runs only the points not done yet. The flow ends with a markdown
artifact `sweep-report`: the table and a link to the MLflow compare view of the experiments' runs.

    python -m flows.sweep        # a temporary local Prefect server is started when no PREFECT_API_URL is set
"""

import hashlib
import itertools
import json
import os
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.interpreter import env_with_interpreter
from flows.presets import set_args
from stages import tracking
from stages.config import ConfigError, flatten, load_params, merge, parse_params, read_yaml, unflatten

COMPARED = ("val_loss", "bits_per_byte")  # the metrics the table shows, from every metrics file that has them


def grid_points(grid: dict[str, tuple]) -> list[dict[str, object]]:
    """Every combination of the grid's values, as {params key: value}."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def check_points(params_file: Path, points: list[dict]) -> None:
    """Fail before anything is queued if a grid point names an unknown key or a bad value."""
    base = read_yaml(params_file)
    for point in points:
        try:
            parse_params(merge(base, unflatten(point)))
        except ConfigError as e:
            raise ConfigError(f"{params_file}: sweep.grid point {point}: {e}") from None


def experiment_name(point: dict[str, object]) -> str:
    """A valid git ref name that the point's values fix: the same point is the same experiment."""
    return "sweep-" + hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]


def dvc(repo: str, *args: str, env: dict[str, str] | None = None) -> str:
    """`dvc <args>` in repo (with `env` over this process's environment); its stdout."""
    environment = env_with_interpreter() | (env or {})
    proc = subprocess.run(["dvc", *args], cwd=repo, env=environment, capture_output=True, text=True)
    if proc.returncode:
        output = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{output}")
    return proc.stdout


@task(task_run_name="queue {name}", cache_policy=NO_CACHE)
def queue_experiment(repo: str, name: str, point: dict[str, object], targets: tuple[str, ...]) -> None:
    queued = dvc(repo, "exp", "run", "--queue", "--name", name, *set_args(point), *targets)
    get_run_logger().info(queued.strip())


@task(cache_policy=NO_CACHE)
def run_queue(repo: str, jobs: int) -> None:
    """`dvc exp run --run-all`: `jobs` queue workers, each running one experiment at a time on its share of the
    cores (queue_env); waits for all. An experiment that fails is reported by DVC and left out of the results."""
    get_run_logger().info(dvc(repo, "exp", "run", "--run-all", "--jobs", str(jobs), env=queue_env(jobs)).strip())


def queue_env(jobs: int) -> dict[str, str]:
    """Each queue job's share of the cores as its thread counts (torch, BLAS, tokenizers), so `jobs` trainings
    at once do not oversubscribe the machine."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads}


def comparison(shown: list[dict], names: dict[str, dict], files: tuple[str, ...]) -> list[dict]:
    """The rows of `dvc exp show --json` for the sweep's experiments: name, grid values, and the COMPARED metrics
    of the metrics files named in `files` (stems; all when empty), as "<file stem>.<key>" or, for a file keyed by
    model (evaluate.json), "<file stem>.<model>.<key>"."""
    revs = (rev for baseline in shown for experiment in baseline.get("experiments") or [] for rev in experiment["revs"])
    rows = []
    for rev in revs:
        if rev.get("name") not in names:
            continue
        row = {"experiment": rev["name"], **names[rev["name"]]}
        for path, content in sorted(((rev.get("data") or {}).get("metrics") or {}).items()):
            stem = Path(path).stem
            if not files or stem in files:
                metrics = flatten(content.get("data") or {})  # evaluate.json: one entry per model
                row |= {f"{stem}.{key}": v for key, v in metrics.items() if key.rsplit(".", 1)[-1] in COMPARED}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows])


def compare_link(repo: Path, experiment: str, stage: str, points: dict[str, dict]) -> str | None:
    """The MLflow UI's compare view of each sweep experiment's newest `stage` run, or None without MLflow. Each
    run gets its grid point as params (a stage logs only its own stage's keys), so that the view plots the swept
    params against the runs' metrics."""
    try:
        import mlflow
        from mlflow.entities import Param

        client = mlflow.MlflowClient(tracking.tracking_uri(repo))
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs(  # MLflow's filter has no IN for tags: pick the sweep's runs here
            [found.experiment_id],
            f"tags.stage = '{stage}' and tags.dvc_experiment LIKE 'sweep-%'",
            order_by=["attributes.start_time DESC"],
        )
        newest = {r.data.tags["dvc_experiment"]: r for r in reversed(runs) if r.data.tags["dvc_experiment"] in points}
        for name, run in newest.items():
            swept = {key: str(value) for key, value in points[name].items() if key not in run.data.params}
            client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in swept.items()])
    except Exception as e:  # noqa: BLE001 - the table stands without the link
        get_run_logger().warning("no MLflow compare link: %s", e)
        return None
    return tracking.compare_link(found.experiment_id, [run.info.run_id for run in newest.values()])


@flow(name="sweep")
def sweep(repo: str = ".") -> list[dict]:
    """Run params.yaml's sweep grid as DVC experiments; returns one row per experiment."""
    repo_path = Path(repo).resolve()
    repo = str(repo_path)
    params = load_params(repo_path / "params.yaml")
    cfg = params.sweep
    points = grid_points(cfg.grid)
    check_points(repo_path / "params.yaml", points)
    names = {experiment_name(point): point for point in points}
    done = set(dvc(repo, "exp", "list", "--name-only").split())
    logger = get_run_logger()
    logger.info("%d grid points, %d already run on this commit", len(names), len(done & set(names)))
    for name, point in names.items():
        if name not in done:
            queue_experiment(repo, name, point, cfg.targets)
    if set(names) - done:
        run_queue(repo, cfg.jobs)
    rows = comparison(json.loads(dvc(repo, "exp", "show", "--json")), names, cfg.targets)
    link = compare_link(repo_path, params.run.experiment, (cfg.targets or ("evaluate",))[-1], names)
    table = markdown(rows)
    logger.info("sweep results:\n%s", table)
    compare = f"\n\n[Compare the runs in MLflow]({link})" if link else ""
    create_markdown_artifact(f"# Sweep\n\n{table}{compare}", key="sweep-report", description="the sweep's experiments")
    return rows


if __name__ == "__main__":
    from flows.server import require_api

    require_api()
    sweep()
