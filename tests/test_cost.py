"""The cost ledger (stages/cost.py): a process tree's measured cost, and which stages ran in the current repro."""

import subprocess
import sys
import time

from lm import io
from stages import cost
from stages.config import Paths


def test_meter_counts_the_process_tree_its_cpu_memory_and_bytes(tmp_path):
    meter = cost.Meter()
    # a child that holds 200 MB for a second and writes 5 MB
    out = tmp_path / "out"
    script = f"b = bytearray(200 * 2**20); open({str(out)!r}, 'wb').write(b[: 5 * 2**20]); import time; time.sleep(1.2)"
    subprocess.run([sys.executable, "-c", script], check=True)
    sum(i * i for i in range(2_000_000))  # CPU time of this process
    spent = meter.finish({"tokens": 1000, "train_flops": 6e9, "mfu": 0.5, "val_loss": 3.0, "seconds": {"read": 1.5}})
    assert spent["peak_rss_mb"] > 200, "the child's memory counts while it runs"
    assert spent["written_bytes"] >= 5 * 2**20
    assert spent["cpu_user_s"] > 0 and spent["wall_s"] >= 1.2
    assert spent["started_at"] < spent["finished_at"] <= time.time()
    assert (spent["tokens"], spent["train_flops"], spent["mfu"]) == (1000, 6e9, 0.5) and "val_loss" not in spent
    assert spent["phases_s"] == {"read": 1.5}, "a stage's phases are its cost, not its metrics"


def test_ledger_marks_what_ran_since_the_first_stage_started_and_totals_it(tmp_path):
    paths = Paths(metrics=str(tmp_path / "metrics"), reports=str(tmp_path / "reports"), plots=str(tmp_path / "plots"))
    base = {"cpu_user_s": 1.0, "cpu_system_s": 0.1, "read_bytes": 10, "written_bytes": 20}
    stages = ["sources", "ingest", "pretrain"]
    cost.record(
        "ingest", base | {"wall_s": 5.0, "peak_rss_mb": 100.0, "started_at": 10, "finished_at": 15}, stages, paths
    )
    cost.record(
        "sources", base | {"wall_s": 1.0, "peak_rss_mb": 50.0, "started_at": 20, "finished_at": 21}, stages, paths
    )
    pretrain = {"wall_s": 60.0, "peak_rss_mb": 900.0, "tokens": 4096, "mfu": 0.5, "started_at": 22, "finished_at": 82}
    cost.record("pretrain", base | pretrain, stages, paths)
    book = io.read_json(tmp_path / "metrics" / "ledger.json")
    assert list(book["stages"]) == stages, "in pipeline order"
    assert {s: e["ran"] for s, e in book["stages"].items()} == {"sources": True, "ingest": False, "pretrain": True}
    assert book["this_run"]["wall_s"] == 61.0 and book["this_run"]["stages_ran"] == 2
    assert book["from_scratch"]["wall_s"] == 66.0 and book["from_scratch"]["peak_rss_mb"] == 900.0
    table = (tmp_path / "reports" / "ledger.md").read_text()
    assert "| ingest | cached |" in table and "| pretrain | yes | 60.0 |" in table and "**this run**" in table
    assert (tmp_path / "plots" / "ledger.csv").read_text().splitlines()[0].startswith("stage,ran,wall_s")


def test_readme_table_is_replaced_between_its_markers(tmp_path):
    readme, table = tmp_path / "README.md", tmp_path / "ledger.md"
    readme.write_text(f"intro\n{cost.README_START}\nold\n{cost.README_END}\nafter\n")
    table.write_text("| new |\n")
    cost.update_readme(table, readme)
    assert readme.read_text() == f"intro\n{cost.README_START}\n| new |\n{cost.README_END}\nafter\n"
