"""The sweep flow's pure parts: the grid, its validation, names, and reading `dvc exp show --json`."""

import pytest
import yaml

from flows.sweep import check_points, comparison, experiment_name, grid_points, markdown
from stages.config import ConfigError, load_params

GRID = {"pretrain.model.norm_placement": ("pre", "mix_ln"), "pretrain.train.schedule": ("cosine", "wsd", "linear")}


def test_grid_points_are_every_combination_in_order():
    points = grid_points(GRID)
    assert len(points) == 6 and points[0] == {
        "pretrain.model.norm_placement": "pre",
        "pretrain.train.schedule": "cosine",
    }
    assert len({experiment_name(p) for p in points}) == 6, "a name per point"
    assert experiment_name(dict(reversed(points[1].items()))) == experiment_name(points[1]), "key order is not identity"


def test_a_bad_point_fails_before_anything_is_queued_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({}))
    check_points(params, grid_points(GRID))
    with pytest.raises(
        ConfigError, match=r"sweep.grid point .*pretrain.model.norm_placement: 'sideways' is not allowed"
    ):
        check_points(params, [{"pretrain.model.norm_placement": "sideways"}])
    with pytest.raises(ConfigError, match="unknown key pretrain.train.warp"):
        check_points(params, [{"pretrain.train.warp": 9}])


def test_default_grid_is_normalization_by_schedule():
    assert set(load_params().sweep.grid) == set(GRID)


def test_comparison_reads_the_sweeps_experiments_from_exp_show():
    def rev(name, loss):
        metrics = {
            "metrics/pretrain.json": {"data": {"val_loss": loss, "tokens_per_s": 1.0}},
            "metrics/evaluate.json": {"data": {"pretrain": {"val_loss": loss, "bits_per_byte": loss / 2, "params": 3}}},
        }
        return {"name": name, "data": {"metrics": metrics}}

    shown = [
        {"rev": "workspace", "experiments": None},
        {"rev": "abc", "experiments": [{"revs": [rev("sweep-a", 4.0)]}, {"revs": [rev("other", 9.0)]}]},
    ]
    rows = comparison(shown, {"sweep-a": {"k": 1}}, ())
    assert rows == [
        {
            "experiment": "sweep-a",
            "k": 1,
            "evaluate.pretrain.val_loss": 4.0,
            "evaluate.pretrain.bits_per_byte": 2.0,
            "pretrain.val_loss": 4.0,
        }
    ]
    assert comparison(shown, {"sweep-a": {"k": 1}}, ("pretrain",)) == [
        {"experiment": "sweep-a", "k": 1, "pretrain.val_loss": 4.0}
    ]
    assert markdown(rows).splitlines()[2].startswith("| sweep-a | 1 | 4.0000 | 2.0000 | 4.0000 |")
