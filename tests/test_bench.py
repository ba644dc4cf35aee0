"""The benchmarks' params: what bench/*.py give a stage's command in the workspace they run it in."""

import sys
from pathlib import Path

import yaml

from stages.config import load_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

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
