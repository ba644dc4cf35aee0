"""The README's first command as a newcomer meets it: `make setup`, then `make run`, on a fresh clone of this
checkout's HEAD, each timed as a whole process; then every bar of the default pipeline, read from what that run
wrote (metrics/ledger.json, metrics/evaluate.json, metrics/compare.json).

    python bench/pipeline.py [--keep DIR]     # DIR: where the clone goes, and stays (default: a temp folder)

Bars: the stages (the ledger's wall seconds for this run) within 8 minutes; set-up within 2; both together
within 11; pretrain's MFU at least 0.5 against the measured GEMM peak (on a CPU); every evaluate.compare pair
"a better" (its whole 95% interval below zero); bits per byte over the quantize source at most +1% for int8 and
+5% for int4 GPTQ, over the prune source at most +10% for 2:4 (prune_nm); pretrain at most 1.79 bits per byte.
Ends with one JSON line: the figures, each bar's verdict, ratio = 8 minutes / the stages' seconds (higher is
better) and bar_met (every bar).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm.stats import pair_verdict
from stages.config import load_params

ROOT = Path(__file__).resolve().parents[1]
STAGES_BAR_S, SETUP_BAR_S, TOTAL_BAR_S = 8 * 60, 2 * 60, 11 * 60
MFU_BAR, PRETRAIN_BPB_BAR = 0.5, 1.79
GROWTH_BARS = {"quantize_int8": 0.01, "quantize_int4_gptq": 0.05, "prune_nm": 0.10}  # bits per byte over the source


def timed_make(target: str, cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(["make", target], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"make {target} failed in {cwd}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def newcomer_env() -> dict:
    """This environment without the interpreter running the bench: make builds and uses the clone's own."""
    ours = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != ours)
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | {"PATH": path}


def bars(clone: Path, setup_s: float, run_s: float) -> dict:
    params = load_params(clone / "params.yaml")
    metrics = clone / params.paths.metrics
    ledger = json.loads((metrics / "ledger.json").read_text())
    models = json.loads((metrics / "evaluate.json").read_text())
    compared = json.loads((metrics / "compare.json").read_text())
    stages_s = ledger["this_run"]["wall_s"]
    pretrain_mfu = ledger["stages"]["pretrain"].get("mfu")
    bpb = {name: row["bits_per_byte"] for name, row in models.items()}
    source = {"quantize_int8": params.quantize.source, "quantize_int4_gptq": params.quantize.source}
    source["prune_nm"] = params.prune.source
    growth = {name: bpb[name] / bpb[source[name]] - 1 for name in GROWTH_BARS}
    verdicts = {
        "stages": stages_s <= STAGES_BAR_S,
        "setup": setup_s <= SETUP_BAR_S,
        "setup_and_run": setup_s + run_s <= TOTAL_BAR_S,
        "pretrain_mfu": pretrain_mfu is not None and pretrain_mfu >= MFU_BAR,
        "pretrain_bits_per_byte": bpb["pretrain"] <= PRETRAIN_BPB_BAR,
        **{
            f"{pair}_a_better": pair_verdict(c["val_loss_delta"], c["val_loss_delta_ci95"]) == "a better"
            for pair, c in compared.items()
        },
        **{f"{name}_growth": growth[name] <= bar for name, bar in GROWTH_BARS.items()},
    }
    return {
        "setup_s": round(setup_s, 1),
        "make_run_s": round(run_s, 1),
        "stages_s": round(stages_s, 1),
        "stage_wall_s": {name: round(s["wall_s"], 1) for name, s in ledger["stages"].items()},
        "pretrain_mfu": pretrain_mfu and round(pretrain_mfu, 3),
        "bits_per_byte": {name: round(v, 4) for name, v in bpb.items()},
        "growth_over_source": {name: round(v, 4) for name, v in growth.items()},
        "compare": {
            pair: [round(c["val_loss_delta"], 4), round(c["val_loss_delta_ci95"], 4)] for pair, c in compared.items()
        },
        "bars": verdicts,
        "ratio": round(STAGES_BAR_S / stages_s, 3),
        "bar_met": all(verdicts.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="clone here and keep it (must not exist yet)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = args.keep or Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = newcomer_env()
        setup_s = timed_make("setup", clone, env)
        run_s = timed_make("run", clone, env)
        print(json.dumps({"bench": "pipeline", **bars(clone, setup_s, run_s)}))


if __name__ == "__main__":
    main()
