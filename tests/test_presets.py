"""Every shipped preset applies to params.yaml as valid config, and its -S arguments read back as set."""

import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from flows.presets import PRESETS, load_preset, merged, set_args
from stages.config import flatten, load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_preset_is_valid_params(name, tmp_path):
    overrides = load_preset(name)
    params = merged(ROOT / "params.yaml", overrides)
    for key, value in flatten(overrides).items():
        section = params
        for part in key.split("."):
            section = getattr(section, part)
        assert section == value, key
    args = set_args(overrides)
    assert args[::2] == ["-S"] * len(flatten(overrides))
    # DVC's own rewrite of params.yaml for `-S` (ruamel, YAML 1.2, quotes dropped) must read back as these params
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", args[1::2])
    assert load_params(tmp_path / "params.yaml") == params


def test_gpt2_preset_is_the_124m_shape():
    params = merged(ROOT / "params.yaml", load_preset("gpt2-124m"))
    model = params.pretrain.model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size, model.vocab_size) == (12, 12, 768, 1024, 50304)
    assert params.pretrain.train.precision == "bf16-mixed"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(SystemExit, match="no preset 'nope'; presets: cpu-tiny, gpt2-124m"):
        load_preset("nope")
