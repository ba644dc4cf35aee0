import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from stages import dvcfile
from stages.config import PLACEMENT_ONLY, TRAINING_BLOCKS, ConfigError, Params, as_dict, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"pretrain", "distill", "scratch", "prune"}  # the stages that train (prune: recovery)


def test_params_yaml_parses_and_writes_out_every_key():
    from dvc.utils.serialize import load_yaml

    load_yaml(ROOT / "params.yaml")  # DVC's own reader is stricter (`{path: builtin:x}` fails there, not here)
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    blocks = {f"{section}.{block}" for section, block in TRAINING_BLOCKS}

    def check(cls, data, key):
        fields = {f.name for f in dataclasses.fields(cls)}
        if key in blocks:  # a training block lists only where it differs from the `train:` section
            assert set(data) <= fields, f"params.yaml {key}"
            return
        assert set(data) == fields, f"params.yaml {key or '.'} lists every field"
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
        ({"train": {"lr": "fast"}}, "train.lr: expected float, got str 'fast'"),
        ({"train": {"warmup_steps": 500}}, "train: warmup_steps (500) must be <= max_steps (300)"),
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
        ({"evaluate": {"models": ["pretrain", "int4"]}}, "evaluate.models[1]: 'int4' is not a model these params"),
        (
            {"evaluate": {"models": ["quantize_int4_gptq"], "gates": {"int4": {"max_val_loss_increase": 0.1}}}},
            "evaluate.gates.int4: quantize_int4_gptq's gate needs ['prune_wanda'] scored; add them to evaluate.models",
        ),
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


def test_training_blocks_take_the_shared_defaults_under_their_own_keys():
    p = parse_params({"train": {"lr": 0.01, "batch_size": 4}, "prune": {"recovery": {"lr": 0.002}}})
    assert p.pretrain.train.lr == p.distill.train.lr == 0.01 and p.prune.recovery.lr == 0.002
    assert p.pretrain.train.batch_size == p.distill.train.batch_size == p.prune.recovery.batch_size == 4
    shipped = load_params(ROOT / "params.yaml")
    assert shipped.prune.recovery.max_steps == 60 and shipped.pretrain.train == shipped.train


def test_dvc_yaml_agrees_with_params_and_stage_modules():
    params = load_params(ROOT / "params.yaml")
    declared = dvcfile.stages(as_dict(params), ROOT)  # every ${...} resolves
    outputs = {out for stage in declared.values() for out in stage.outs}
    for name, stage in declared.items():
        assert stage.cmd == f"python -m stages {name}" and f"stages/{name}.py" in stage.deps
        # a stage reads its own section (and the seed and the shared training defaults where it trains): other
        # sections' changes never rerun it; scratch trains distill's student without the teacher; evaluate
        # needs the list of variants
        own = {"scratch": {"distill.student", "distill.train"}, "sources": {"ingest.sources", "ingest.extensions"}}
        own = own.get(name, {name})
        if name in PLACEMENT_ONLY:  # each key but those that only place the work
            section = dataclasses.fields(getattr(params, name))
            own = {f"{name}.{f.name}" for f in section if f.name not in PLACEMENT_ONLY[name]}
        listed = {"evaluate": {"prune.methods", "prune.source", "quantize.methods", "quantize.source"}}.get(name, set())
        trains = {"run.seed", "train"} if name in TRAINING else set()
        assert own | trains <= set(stage.params) <= own | listed | trains
        for dep in stage.deps:
            assert dep in outputs or (ROOT / dep).exists(), dep
        if not stage.always_changed:  # its command writes the metrics it returns there
            assert f"{params.paths.metrics}/{name}.json" in stage.outs


@pytest.mark.parametrize("source", ["pretrain", "distill", "scratch"])
def test_prune_depends_on_its_source_model_alone(source):
    """A change to a model prune does not start from never reruns it (DVC resolves `${paths.models}/${prune.source}`
    as dvcfile does)."""
    tree = as_dict(load_params(ROOT / "params.yaml"))
    tree["prune"]["source"] = source
    deps = set(dvcfile.stages(tree, ROOT)["prune"].deps)
    models = {f"models/{stage}" for stage in ("pretrain", "distill", "scratch")}
    assert deps & models == {f"models/{source}"}


def test_flatten_and_merge():
    from stages.config import flatten, merge, unflatten

    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert unflatten({"a.b": 1, "a.c.d": 2, "e": 3}) == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    merged = merge({"a": {"b": 1, "c": 2}, "e": 3}, {"a": {"c": 9}, "f": 4})
    assert merged == {"a": {"b": 1, "c": 9}, "e": 3, "f": 4} and list(merged) == ["a", "e", "f"]
