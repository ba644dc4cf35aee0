"""The benchmarks' params: what bench/*.py give a stage's command in the workspace they run it in; and the
pipeline bench's reading of a run's metrics into its bars."""

import json
import shutil
import sys
from pathlib import Path

import yaml

from stages.config import load_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import bars  # noqa: E402
from pretrain import bench_params  # noqa: E402


def test_bench_params_read_the_given_tokens_and_models_through_the_projects_parser(tmp_path):
    tokens, teacher = tmp_path / "tokens", tmp_path / "teacher"
    teacher.mkdir()
    tree = bench_params(tmp_path, tokens, steps=3, models={"pretrain": teacher})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")  # the project's own parser: a layout change fails here
    assert params.paths.tokens == str(tokens)
    assert (tmp_path / params.paths.model("pretrain")).resolve() == teacher
    assert params.pretrain.train.max_steps == params.distill.train.max_steps == 3
    assert params.pretrain.train.warmup_steps <= 3


def test_pipeline_bars_read_the_runs_ledger_models_and_comparisons(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path)  # default sources: quantize from prune_wanda, prune from distill
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    ledger = {"this_run": {"wall_s": 400.0}, "stages": {"pretrain": {"wall_s": 150.0, "mfu": 0.55}}}
    bpb = {"pretrain": 1.78, "distill": 1.70, "prune_wanda": 1.75, "prune_nm": 1.80}
    bpb |= {"quantize_int8": 1.75 * 1.005, "quantize_int4_gptq": 1.75 * 1.06}  # int4: over its +5% bar
    compared = {"a_vs_b": {"val_loss_delta": -0.01, "val_loss_delta_ci95": 0.004}}
    compared["c_vs_d"] = {"val_loss_delta": -0.003, "val_loss_delta_ci95": 0.004}  # its interval crosses zero
    (metrics / "ledger.json").write_text(json.dumps(ledger))
    (metrics / "evaluate.json").write_text(json.dumps({name: {"bits_per_byte": v} for name, v in bpb.items()}))
    (metrics / "compare.json").write_text(json.dumps(compared))
    figures = bars(tmp_path, setup_s=100.0, run_s=420.0)
    assert figures["ratio"] == 1.2 and figures["growth_over_source"]["prune_nm"] == round(1.80 / 1.70 - 1, 4)
    failed = {name for name, met in figures["bars"].items() if not met}
    assert failed == {"c_vs_d_a_better", "quantize_int4_gptq_growth"} and not figures["bar_met"]
