"""Cost of the Prefect flow over bare DVC when nothing is stale: `python -m flows.pipeline` against an already
running local Prefect server (as a deployment has), against `dvc repro`, each as a whole process.

    python bench/orchestration.py [--runs 3]     # in an up-to-date checkout (after `make run`)

Starts its own Prefect server (temporary PREFECT_HOME, a free port) and uses a temporary MLflow store, so
neither the user's server nor mlflow.db is touched. Ends with one JSON line: the median seconds of each, the bar
(2 x bare + 3 s), ratio = bare / flow (higher is better) and bar_met (flow <= bar).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.server import local_server

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_server() as prefect_env:
        env = os.environ | prefect_env
        env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_ARTIFACT_ROOT": Path(tmp, "a").as_uri()}
        bare_runs = timed([sys.executable, "-m", "dvc", "repro"], env, args.runs)
        flow_runs = timed([sys.executable, "-m", "flows.pipeline"], env, args.runs)
    bare, flow = statistics.median(bare_runs), statistics.median(flow_runs)
    bar = 2 * bare + 3
    runs = {"bare_runs_s": [round(t, 2) for t in bare_runs], "flow_runs_s": [round(t, 2) for t in flow_runs]}
    print(json.dumps(runs | {"bare_dvc_repro_s": round(bare, 3), "flow_s": round(flow, 3), "bar_s": round(bar, 3),
                             "ratio": round(bare / flow, 3), "bar_met": flow <= bar}))  # fmt: skip


if __name__ == "__main__":
    main()
