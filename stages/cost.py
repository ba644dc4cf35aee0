"""What a stage's run costs: wall and CPU seconds, peak memory of its process tree, bytes read and written, and,
from its metrics, tokens, training FLOPs, MFU and its phases' seconds. Every stage's command measures its own process
(stages/cli.py), writes metrics/cost/<stage>.json, then rewrites the ledger from every stage's cost: which
stages ran in the current repro (since the `sources` stage, which every repro runs first, started) and which
DVC kept, with totals; as metrics/ledger.json, a table (reports/ledger.md) and a plot (plots/ledger.csv).

    python -m stages.cost readme   # the README's cost table from reports/ledger.md
"""

import contextlib
import csv
import os
import sys
import threading
import time
from pathlib import Path

import fasteners
import psutil

from lm import io
from stages.config import Paths, load_params

COST_DIR = "cost"
"""Under paths.metrics: each stage's last run's cost, <stage>.json (written by the stage's command)."""

SAMPLE_S = 0.5
PHASES = "seconds"
"""A stage's metrics may carry its phases' wall seconds under this key ({"read": 12.5, ...}). They are cost: they
go to metrics/cost/<stage>.json and the MLflow run (cost.phases_s), never to the metrics file DVC records, which
would then change on every rerun."""


def without_phases(metrics: dict) -> dict:
    """A run's metrics as its metrics file and its MLflow run's metrics hold them."""
    return {k: v for k, v in metrics.items() if k != PHASES}


class Phases(dict):
    """A run's phases' wall seconds, to return under PHASES: `with phases("score"):` adds the block's seconds to
    that phase, so a phase repeated per model or method sums."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - started, 2)


README_START, README_END = "<!-- ledger:start -->", "<!-- ledger:end -->"


class Meter:
    """Measures this process and its children from the process's start (imports included: users wait for them)
    to finish(). Memory and the children's I/O are sampled every SAMPLE_S seconds."""

    def __init__(self):
        self._process = psutil.Process()
        self._started = self._process.create_time()
        self._peak_rss = 0
        self._children_io: dict[int, tuple[int, int]] = {}
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="cost-meter", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while True:
            rss = self._process.memory_info().rss
            for child in self._process.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                    counters = child.io_counters()
                    self._children_io[child.pid] = (counters.read_chars, counters.write_chars)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._peak_rss = max(self._peak_rss, rss)
            if self._done.wait(SAMPLE_S):
                return

    def finish(self, metrics: dict | None) -> dict:
        """The cost so far; tokens, train_flops and mfu come from the stage's metrics where it reports them."""
        self._done.set()
        self._sampler.join()
        times, counters = os.times(), self._process.io_counters()
        read = counters.read_chars + sum(r for r, _ in self._children_io.values())
        written = counters.write_chars + sum(w for _, w in self._children_io.values())
        cost = {
            "wall_s": time.time() - self._started,
            "cpu_user_s": times.user + times.children_user,
            "cpu_system_s": times.system + times.children_system,
            "peak_rss_mb": self._peak_rss / 2**20,
            "read_bytes": read,
            "written_bytes": written,
            "started_at": self._started,
            "finished_at": time.time(),
        }
        work = {
            k: metrics[k] for k in ("tokens", "train_flops", "mfu") if isinstance((metrics or {}).get(k), float | int)
        }
        phases = {"phases_s": metrics[PHASES]} if isinstance((metrics or {}).get(PHASES), dict) else {}
        return cost | work | phases


SUMMED = ("wall_s", "cpu_user_s", "cpu_system_s", "read_bytes", "written_bytes", "tokens", "train_flops")
COLUMNS = ("wall_s", "cpu_user_s", "cpu_system_s", "peak_rss_mb", "read_bytes", "written_bytes", "tokens", "mfu")
FIRST_STAGE = "sources"


def totals(entries: dict[str, dict]) -> dict:
    """Sums over the entries, and the largest peak memory of any one. Stages that ran at once overlap, so the
    summed wall seconds can exceed the repro's own."""
    total = {key: sum(e.get(key, 0) for e in entries.values()) for key in SUMMED}
    return total | {"peak_rss_mb": max((e["peak_rss_mb"] for e in entries.values()), default=0.0)}


def ledger(costs: dict[str, dict]) -> dict:
    """Each stage's last cost, marked ran when it finished after the current repro's first stage started."""
    repro_start = costs[FIRST_STAGE]["started_at"] if FIRST_STAGE in costs else 0.0
    entries = {name: {"ran": c["finished_at"] >= repro_start} | c for name, c in costs.items()}
    ran = {name: e for name, e in entries.items() if e["ran"]}
    return {"stages": entries, "this_run": totals(ran) | {"stages_ran": len(ran)}, "from_scratch": totals(entries)}


def table(book: dict) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, int) or value >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 1 else f"{value:.1f}"

    lines = ["| stage | ran | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for name, e in book["stages"].items():
        ran = "yes" if e["ran"] else "cached"
        lines.append(f"| {name} | {ran} | " + " | ".join(cell(e.get(c)) for c in COLUMNS) + " |")
    for label, key in (("this run", "this_run"), ("from scratch", "from_scratch")):
        lines.append(f"| **{label}** | | " + " | ".join(cell(book[key].get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def record(stage: str, spent: dict, stages: list[str], paths: Paths) -> None:
    """Write the stage's cost, then the ledger anew from every stage's (in `stages` order), one stage at a time
    (stages that run at once each see the other's cost)."""
    metrics_dir = Path(paths.metrics)
    folder = metrics_dir / COST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with fasteners.InterProcessLock(folder / ".lock"):
        io.write_json(folder / f"{stage}.json", spent)
        costs = {s: io.read_json(folder / f"{s}.json") for s in stages if (folder / f"{s}.json").exists()}
        book = ledger(costs)
        io.write_json(metrics_dir / "ledger.json", book)
        with io.atomic_file(Path(paths.reports) / "ledger.md") as tmp:
            tmp.write_text(table(book) + "\n")
        with io.atomic_file(Path(paths.plots) / "ledger.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["stage", "ran", *COLUMNS])
            writer.writerows([name, e["ran"], *(e.get(c, "") for c in COLUMNS)] for name, e in book["stages"].items())


def update_readme(table: Path, readme: Path) -> None:
    """Replace the README's text between the ledger markers by the ledger's table."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_START} ... {README_END} section to fill")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{table.read_text().strip()}\n{README_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] != ["readme"]:
        raise SystemExit(__doc__)
    update_readme(Path(load_params().paths.reports) / "ledger.md", Path("README.md"))
