import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from stages.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sources", "ingest", "curate", "tokenize", "pretrain", "distill", "scratch", "prune", "quantize", "evaluate"]


def test_params_yaml_parses_and_writes_out_every_key():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def check(cls, data, key):
        assert set(data) == {f.name for f in dataclasses.fields(cls)}, f"params.yaml {key or '.'} lists every field"
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if dataclasses.is_dataclass(hints[name]):
                check(hints[name], value, f"{key}.{name}".strip("."))

    check(Params, raw, "")
    assert params == parse_params(raw)


def test_defaults_equal_params_yaml():
    # the dataclass defaults document the shipped configuration
    assert Params() == load_params(ROOT / "params.yaml")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"pretrain": {"model": {"n_layr": 2}}},
            "unknown key pretrain.model.n_layr; allowed keys: activation, bias, block_size",
        ),
        ({"prune": {"scope": "row"}}, "prune.scope: 'row' is not allowed; choose one of 'layer', 'global'"),
        ({"pretrain": {"train": {"lr": "fast"}}}, "pretrain.train.lr: expected float, got str 'fast'"),
        ({"curate": {"val_fraction": 1.5}}, "curate.val_fraction must be in (0.0, 1.0), got 1.5"),
        ({"pretrain": {"model": {"n_head": 3}}}, "pretrain.model: n_embd (128) must be a multiple of n_head (3)"),
        ({"distill": {"train": {"warmup_steps": 500}}}, "distill.train: warmup_steps (500) must be <= max_steps"),
        ({"ingest": {"sources": [{"name": "x"}]}}, "ingest.sources[0]"),
        ({"tokenize": {"vocab_size": True}}, "tokenize.vocab_size: expected int, got bool"),
        ({"bogus": 1}, "unknown key bogus"),
        ({"quantize": {"source": "prune_sparsegpt"}}, "quantize.source: 'prune_sparsegpt' is not allowed; choose one"),
        ({"prune": {"methods": ["wanda", "sparsegpt"]}}, "prune.methods[1]: 'sparsegpt' is not allowed"),
        ({"distill": {"teacher_topk": 32}}, "distill.teacher_topk caches logits only"),
        (
            {"evaluate": {"compare": [["distill", "prune_sparsegpt"]]}},
            "evaluate.compare[0]: 'prune_sparsegpt' is not a",
        ),
        ({"evaluate": {"compare": [["distill"]]}}, "evaluate.compare: each entry must be two different model names"),
        ({"run": {"schedule_interval_s": 60}}, "run: set exactly one of schedule_cron and schedule_interval_s"),
    ],
)
def test_bad_values_fail_with_the_key_path(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    assert message in str(err.value)


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prune:\n  sparsity: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: prune.sparsity must be in [0.0, 1.0)")):
        load_params(bad)


def test_dvc_yaml_agrees_with_params_and_stage_modules():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == STAGES
    params = load_params(ROOT / "params.yaml")
    path_keys = {f.name for f in dataclasses.fields(params.paths)}
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"] and (ROOT / f"stages/{name}.py").exists()
        # a stage reads its own section (and the seed where it trains): other sections' changes never rerun it;
        # scratch trains distill's student without the teacher; evaluate needs the list of variants
        own = {"scratch": {"distill.student", "distill.train"}, "sources": {"ingest.sources", "ingest.extensions"}}
        own = own.get(name, {name})
        listed = {"evaluate": {"prune.methods", "prune.source", "quantize.methods", "quantize.source"}}.get(name, set())
        assert own <= set(stage["params"]) <= own | listed | {"run.seed"}
        text = yaml.safe_dump(stage)
        assert set(re.findall(r"\$\{paths\.(\w+)\}", text)) <= path_keys
        for dep in stage["deps"]:
            assert dep.startswith("${paths.") or (ROOT / dep).exists(), dep


def test_flatten_and_merge():
    from stages.config import flatten, merge, unflatten

    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert unflatten({"a.b": 1, "a.c.d": 2, "e": 3}) == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    merged = merge({"a": {"b": 1, "c": 2}, "e": 3}, {"a": {"c": 9}, "f": 4})
    assert merged == {"a": {"b": 1, "c": 9}, "e": 3, "f": 4} and list(merged) == ["a", "e", "f"]
