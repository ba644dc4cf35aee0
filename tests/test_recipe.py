"""The recipe runner's parts that need no DVC queue: the shipped recipes, names, the judging of arms, the exact
same-weights check and the report (tests/test_integration.py runs recipes end to end)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models

from flows.recipe import (
    RECIPES,
    Recipe,
    RecipeTest,
    compare_arm,
    experiment_name,
    experiment_revs,
    headline,
    load_recipe,
    markdown,
    model_windows,
    same_weights_difference,
    seed_spread,
)
from flows.sweep import check_points
from lm import io, model_dir
from lm.gpt import GPT, GPTConfig
from stages.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_is_valid_and_so_is_every_run_it_queues(name):
    recipe = load_recipe(name)
    runs = [recipe.overrides(arm, seed) for arm in recipe.arms for seed in recipe.seeds]
    check_points(ROOT / "params.yaml", runs)
    assert recipe.paper and recipe.claim and recipe.budget_minutes <= 12
    if recipe.test.kind != "noise_floor":
        assert len(recipe.seeds) >= 3 or load_recipe(recipe.noise_floor).test.kind == "noise_floor"


def test_recipes_that_share_an_arm_share_its_experiments():
    """Content-hash names: the same overrides and targets are the same experiment, whichever recipe asks."""
    normformer, mix_ln = load_recipe("normformer"), load_recipe("mix_ln")
    same = [experiment_name(r.overrides("pre_ln", 1), r.targets) for r in (normformer, mix_ln)]
    assert same[0] == same[1]
    assert experiment_name(normformer.overrides("pre_ln", 2), normformer.targets) != same[0], "the seed is in it"
    assert experiment_name(normformer.overrides("pre_ln", 1), ("pretrain", "evaluate")) != same[0]


def test_a_bad_recipe_fails_naming_the_file_and_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("paper: p\nclaim: c\narms: {a: {}}\ncontrol: b\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: control: 'b' is not an arm"):
        load_recipe("bad", tmp_path)
    (tmp_path / "bad.yaml").write_text("paper: p\nclaim: c\narms: {a: {}, b: {}}\ncontrol: a\ntest: {kind: better}\n")
    with pytest.raises(ConfigError, match=r"test.kind: 'better' is not allowed"):
        load_recipe("bad", tmp_path)
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        load_recipe("nope", tmp_path)


def recipe(kind="superiority", seeds=(1, 2, 3), **test) -> Recipe:
    return Recipe(
        paper="p",
        claim="c",
        arms={"control": {}, "arm": {"pretrain.model.norm": "rmsnorm"}},
        control="control",
        seeds=seeds,
        test=RecipeTest(kind=kind, **test),
    )


def losses(shift: float, seeds=(1, 2, 3), noise=0.05, windows=400) -> dict:
    """Per-window losses sharing each window's difficulty (as two models on the same text do), the arm shifted."""
    rng = np.random.default_rng(0)
    out = {}
    for seed in seeds:
        difficulty = rng.normal(4.0, 0.5, windows)
        out["control", seed] = difficulty + rng.normal(0, noise, windows) + rng.normal(0, 0.01)
        out["arm", seed] = difficulty + rng.normal(0, noise, windows) + shift + rng.normal(0, 0.01)
    return out


def test_a_clear_gain_is_reproduced_no_difference_is_not_and_a_wrong_sign_is_not():
    r = recipe()
    gain = compare_arm(r, "arm", losses(-0.1), None)
    assert gain["verdict"] == "REPRODUCED" and gain["delta"] == pytest.approx(-0.1, abs=0.03)
    assert gain["high"] < 0 and gain["windows"] == 400 and gain["seeds"] == 3
    assert compare_arm(r, "arm", losses(+0.1), None)["verdict"] == "NOT REPRODUCED"
    assert compare_arm(recipe(margin=0.2), "arm", losses(-0.1), None)["verdict"] == "NOT REPRODUCED"
    equivalent = recipe("equivalence", margin=0.05)
    assert compare_arm(equivalent, "arm", losses(0.0), None)["verdict"] == "REPRODUCED"
    assert compare_arm(equivalent, "arm", losses(0.2), None)["verdict"] == "NOT REPRODUCED"


def test_fewer_than_three_seeds_need_the_noise_floor_and_it_widens_the_interval():
    r = recipe(seeds=(1, 2))
    with pytest.raises(ConfigError, match="run the noise-floor recipe first"):
        compare_arm(r, "arm", losses(-0.02, seeds=(1, 2)), None)
    narrow = compare_arm(r, "arm", losses(-0.02, seeds=(1, 2)), 0.0)
    wide = compare_arm(r, "arm", losses(-0.02, seeds=(1, 2)), 0.05)
    assert wide["half_width"] > narrow["half_width"] and wide["noise_floor_sd"] == 0.05
    assert wide["verdict"] == "INCONCLUSIVE"


def test_arms_scored_on_different_windows_cannot_be_paired():
    pairs = losses(0.0)
    pairs["arm", 2] = pairs["arm", 2][:-1]
    with pytest.raises(ConfigError, match="pairing needs the same windows"):
        compare_arm(recipe(), "arm", pairs, None)


def test_seed_spread_is_the_sd_of_the_runs_mean_losses():
    assert seed_spread({1: np.array([1.0, 1.0]), 2: np.array([2.0, 2.0]), 3: np.array([3.0, 3.0])}) == 1.0


def saved(tmp_path: Path, cfg: GPTConfig) -> Path:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norm gains off their init, so a wrong norm shows
    tokenizer = tmp_path / "tokenizer.json"
    tmp_path.mkdir()
    Tokenizer(models.BPE()).save(str(tokenizer))
    model_dir.save(model, tmp_path / "model", tokenizer, {"name": "pretrain"})
    return tmp_path / "model"


def test_the_exact_check_loads_the_controls_weights_into_the_arms_architecture(tmp_path):
    val = np.random.default_rng(0).integers(0, 64, 200).astype(np.uint16)
    centered = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64, center_residual=True)
    exact = recipe("exact", seeds=(1,))
    exact = dataclasses.replace(exact, base={"pretrain.model.center_residual": True})
    assert same_weights_difference(exact, "arm", saved(tmp_path / "a", centered), val) <= 1e-5
    plain = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    assert same_weights_difference(exact, "arm", saved(tmp_path / "b", plain), val) > 1e-3, "no centering: no match"
    other = dataclasses.replace(exact, arms={"control": {}, "arm": {"pretrain.train.lr": 0.1}})
    with pytest.raises(ConfigError, match=r"must differ from 'control' in pretrain.model.\* keys only"):
        same_weights_difference(other, "arm", saved(tmp_path / "c", centered), val)


def test_experiment_revs_reads_finished_experiments_from_exp_show():
    shown = [
        {
            "rev": "abc",
            "experiments": [
                {"revs": [{"name": "rcp-1", "rev": "s1", "data": {"status": "Success"}}]},
                {"revs": [{"name": "rcp-2", "rev": "s2", "data": {"status": "Failed"}}]},
            ],
        }
    ]
    assert experiment_revs(shown) == {"rcp-1": "s1"}


def test_the_report_and_the_line_say_the_verdict_and_its_numbers():
    r = recipe()
    result = compare_arm(r, "arm", losses(-0.1), None)
    summary = {
        "commit": "0123456789abcdef",
        "seconds": 581.0,
        "experiments": 6,
        "reused": 2,
        "experiments_by_arm": {"control": ["rcp-a"], "arm": ["rcp-b"]},
        "val_loss": {"control": {"1": 4.0}, "arm": {"1": 3.9}},
        "comparisons": [result],
        "verdict": "REPRODUCED",
    }
    line = headline("norms", r, result, 581.0)
    assert line.startswith("norms [arm − control]: REPRODUCED Δ=-0.") and line.endswith(
        "(3 seeds × 400 windows), 9m41s"
    )
    text = markdown("norms", r, summary)
    assert "**Verdict: REPRODUCED** in 9.7 min of a 12-minute budget" in text and "| arm − control | -0.1" in text
    json.dumps(summary)


def test_interleaved_timing_gives_each_model_its_steps_and_tells_a_bigger_one():
    from flows.recipe import interleaved_step_seconds

    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    big = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=8, vocab_size=64))
    batch = torch.randint(0, 64, (8, 9))
    seconds = interleaved_step_seconds({"small": small, "big": big}, batch, rounds=6)
    assert [len(t) for t in seconds.values()] == [6, 6]
    assert np.median(seconds["big"]) > np.median(seconds["small"])
    line = headline("speed", recipe("speed", seeds=(1,)), {**compare_arm(recipe(), "arm", losses(0.0), None)}, 30)
    assert "of the step time (400 rounds)" in line


def test_the_readme_table_lists_every_recipe_run_or_not(tmp_path):
    from flows.recipe import results_table

    (tmp_path / "recipes").mkdir()
    for name in ("normformer", "noise_floor"):
        (tmp_path / "recipes" / f"{name}.yaml").write_text((RECIPES / f"{name}.yaml").read_text())
    (tmp_path / "params.yaml").write_text("{}")
    (tmp_path / "metrics" / "recipes").mkdir(parents=True)
    floor = {"seed_sd": 0.0553, "seconds": 108.0, "verdict": "MEASURED"}
    (tmp_path / "metrics" / "recipes" / "noise_floor.json").write_text(json.dumps(floor))
    table = results_table(tmp_path).splitlines()
    assert table[2].startswith("| [noise_floor](reports/recipes/noise_floor.md) |")
    assert table[2].endswith("| MEASURED | seed sd 0.0553 nats (4 seeds) | 1m48s |")
    assert (
        table[3]
        == "| normformer | NormFormer: Improved Transformer Pretraining with Extra Normalization | not run | | |"
    )


def test_the_scaling_judgement_fits_both_ways_and_predicts_the_held_out_target(tmp_path):
    from flows.recipe import judge_ladder, scaling_figure, scaling_markdown, write_points
    from lm.scaling import Law

    law = Law(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)
    sizes = {f"n{i}": n for i, n in enumerate((1e5, 3e5, 1e6, 3e6, 1e7))} | {"target": 3e7}
    rng = np.random.default_rng(0)
    curves = {
        arm: [
            {"step": s, "tokens": s * 4e6, "val_loss": float(law.loss(n, s * 4e6)) + rng.normal(0, 0.003)}
            for s in range(1, 9)
        ]  # fmt: skip
        for arm, n in sizes.items()
    }
    spec = Recipe(
        paper="p", claim="c", arms={arm: {} for arm in sizes}, control="target", test=RecipeTest(kind="scaling")
    )
    judged = judge_ladder(spec, curves, sizes, seed_sd=0.05)
    assert judged["laws"]["intermediate"]["alpha"] == pytest.approx(0.34, abs=0.1)
    assert abs(judged["prediction_errors"]["intermediate"]) < 0.05
    assert judged["verdict"] in ("REPRODUCED", "INCONCLUSIVE", "NOT REPRODUCED") and judged["margin"] == 0.05
    assert len(judged["points"]) == 6 * 8 and judged["target"]["N"] == 3e7
    summary = judged | {"commit": "0" * 10, "seconds": 60.0, "experiments": 6, "reused": 0}
    summary["experiments_by_arm"] = {arm: [f"rcp-{arm}"] for arm in sizes}
    text = markdown("ladder", spec, summary)
    assert "| every intermediate validation |" in text and "Compute-optimal split" in text
    write_points(judged["points"], tmp_path / "ladder.csv")
    assert (tmp_path / "ladder.csv").read_text().splitlines()[
        0
    ] == "model,N,tokens,val_loss,fit_intermediate,fit_final_only"
    assert scaling_figure(summary).axes[0].get_xscale() == "log"
    assert scaling_markdown(summary)[-1].startswith("| 100x C₀ |")
    with pytest.raises(ConfigError, match="a ladder of at least 5 sizes"):
        Recipe(paper="p", claim="c", arms={"a": {}, "target": {}}, control="target", test=RecipeTest(kind="scaling"))


def test_an_arm_can_compare_its_own_model_relative_to_a_reference():
    spec = load_recipe("magnitude_retrain")
    assert spec.quantity("magnitude_retrain") == "prune_magnitude − prune_dense"
    assert spec.quantity("wanda") == "prune_wanda − pretrain"
    assert spec.windows_file("reports") == "reports/prune_windows.parquet"
    assert spec.overrides("wanda", 2)["prune.seed"] == 2 and "run.seed" not in spec.overrides("wanda", 2)
    assert spec.overrides("wanda", 2)["prune.methods"] == ["wanda", "magnitude", "dense"]
    with pytest.raises(ConfigError, match=r"relative_to: \['dense'\] are not arms"):
        dataclasses.replace(spec, relative_to={"dense": "pretrain"})


def test_a_domain_recipe_pairs_only_that_domains_windows_in_window_order():
    df = pd.DataFrame(
        {
            "model": ["pretrain"] * 4 + ["other"],
            "window": [3, 0, 1, 2, 0],
            "val_loss": [4.0, 1.0, 2.0, 3.0, 9.0],
            "domain": ["docs", "code", "docs", "code", "docs"],
        }
    )
    assert model_windows(df, "pretrain", "docs", "w").tolist() == [2.0, 4.0]
    assert model_windows(df, "pretrain", "", "w").tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(io.DataError, match="w: no windows of model 'pretrain' in domain 'web'"):
        model_windows(df, "pretrain", "web", "w")
