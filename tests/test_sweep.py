"""The sweep flow's pure parts: the grid, its validation, names, and reading `dvc exp show --json`."""

import pytest
import yaml

from flows.sweep import check_points, compare_link, comparison, experiment_name, grid_points, markdown
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


def test_the_compare_link_gives_each_experiments_newest_run_its_grid_point_as_params(tmp_path, monkeypatch):
    """An evaluate run logs only evaluate's keys; in the compare view, the sweep's runs must differ in the swept
    params, or its parallel-coordinates plot draws flat lines."""
    import mlflow

    from stages.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    points = {experiment_name(p): p for p in grid_points(GRID)[:2]}
    for name in points:
        monkeypatch.setenv("DVC_EXP_NAME", name)
        with stage_run("evaluate", "exp", {"evaluate": {"seed": 0}}, []) as run:
            run.log_metrics({"distill.bits_per_byte": 2.0})
    link = compare_link(tmp_path, "exp", "evaluate", points)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert all(r.info.run_id in link for r in runs)
    swept = {r.data.tags["dvc_experiment"]: {k: v for k, v in r.data.params.items() if k in GRID} for r in runs}
    assert swept == {name: point for name, point in points.items()}
    assert all(r.data.params["evaluate.seed"] == "0" for r in runs)
