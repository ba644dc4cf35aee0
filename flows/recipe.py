"""A paper's claim, tested here with one command: `python -m flows.recipe <name>` (or `make recipe NAME=<name>`)
runs recipes/<name>.yaml and prints its verdict, e.g.

    normformer [normformer − pre_ln]: INCONCLUSIVE Δ=-0.0040 ± 0.0110 nats (2 seeds × 640 windows), 9m41s

Every arm × seed is a DVC experiment (base overrides, the arm's, run.seed) named by a hash of what it runs, so
an arm two recipes share runs once per commit, and a rerun runs only what is missing. Each experiment's training
stage (or evaluate) writes the val loss of every val window; the recipe pairs arm and control window by window
for each seed (batch-means intervals, lm/stats.py), aggregates the seeds (a t-interval from 3 seeds on; below
that, widened by the seed-to-seed spread the noise-floor recipe measured) and judges the claim on the interval:
REPRODUCED, NOT REPRODUCED or INCONCLUSIVE. Kinds of test:

- superiority: the arm's val loss differs from the control's by more than `margin` in `direction`;
- equivalence: TOST, the 1 - 2 alpha interval of the difference lies within ±margin;
- exact: the control's trained weights, loaded into the arm's architecture, give the same logits (max |Δ| at
  most `tolerance`); the trained arms' difference is reported beside it;
- noise_floor: one arm, at least 3 seeds: the standard deviation of a run's mean val loss between seeds, which
  recipes with fewer seeds add to their intervals;
- scaling: the arms are a ladder of model sizes, trained with val_every; L(N, D) is fitted (lm/scaling.py) once
  on every intermediate validation of the ladder and once on its final losses only, and each fit predicts the
  held-out control (a larger model): the intermediate fit is REPRODUCED as the better predictor when its error
  is smaller by more than the noise floor's seed spread (NOT REPRODUCED when larger by as much);
- speed: no experiments; each arm's pretrain model takes training steps in this process, the arms in turns, and
  the arm's step time relative to the control's is judged over the rounds (margin: a fraction).

Outputs: reports/recipes/<name>.md, metrics/recipes/<name>.json, a Prefect markdown artifact, and an MLflow parent
run `recipe <name>` with one child run per arm.
"""

import argparse
import dataclasses
import hashlib
import io as bytes_io
import json
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.sweep import check_points, dvc, queue_experiment, run_queue
from lm import io, scaling, stats, tables
from lm.tokens import load_tokens
from lm.train import new_model
from stages import tracking
from stages.config import (
    ConfigError,
    config_section,
    load_as,
    load_params,
    merge,
    parse_params,
    read_yaml,
    unflatten,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
Scalar = str | int | float | bool
Value = Scalar | tuple[Scalar, ...]


@config_section
class RecipeTest:
    kind: Literal["superiority", "equivalence", "exact", "noise_floor", "speed", "scaling"] = "superiority"
    direction: Literal["lower", "higher"] = "lower"
    """superiority: the claimed sign of arm − control (lower: the arm's val loss is lower)."""
    margin: float = 0.0
    """Nats per token: superiority beyond it, equivalence within ±it; speed: a fraction of the control's step
    time (0.07: the arm's steps are more than 7% faster)."""
    alpha: float = 0.05
    """Superiority: a two-sided 1 - alpha interval; equivalence (TOST): a 1 - 2 alpha one."""
    tolerance: float = 1e-5
    """exact: the largest allowed |logit difference| at the same weights."""

    def __post_init__(self):
        if self.margin < 0 or not 0 < self.alpha < 0.5 or self.tolerance <= 0:
            raise ConfigError(f"test: margin >= 0, alpha in (0, 0.5), tolerance > 0; got {self}")

    @property
    def confidence(self) -> float:
        return 1 - 2 * self.alpha if self.kind == "equivalence" else 1 - self.alpha


@config_section
class Recipe:
    paper: str
    """The paper's title, as ../shared/RESEARCH.md gives it."""
    claim: str
    """The claim, quoted or paraphrased from the abstract, and what this recipe checks of it."""
    base: dict[str, Value] = field(default_factory=dict)
    """params overrides (dotted keys) every arm runs with."""
    arms: dict[str, dict[str, Value]]
    """arm name -> its params overrides, over base."""
    control: str
    """The arm every other arm is compared with (arm − control)."""
    seeds: tuple[int, ...] = (1,)
    """run.seed of each run of every arm."""
    targets: tuple[str, ...] = ("pretrain",)
    """The stages each experiment reproduces (DVC restores the unchanged ones from its cache)."""
    model: str = "pretrain"
    """The model whose val loss per window is compared."""
    models: dict[str, str] = field(default_factory=dict)
    """arm -> the model compared for it, where not `model` (arms with the same overrides share experiments, so
    one experiment can make every arm's model: prune_magnitude, prune_wanda)."""
    relative_to: dict[str, str] = field(default_factory=dict)
    """arm -> a model of the same experiment whose loss is subtracted from the arm's model's, window by window,
    before arms are compared: prune_wanda relative to its source, prune_magnitude relative to prune_dense (the
    recovery steps' own gain taken out)."""
    domain: str = ""
    """Compare only the val windows of this domain (their middle token's); "": every window."""
    seed_key: str = "run.seed"
    """The params key each seed is written to (prune.seed: the source model stays the baseline's)."""
    windows: str = ""
    """The per-window loss file; "": reports/<stage>_windows.parquet of the stage that made `model`, or
    evaluate's when evaluate is a target."""
    test: RecipeTest = field(default_factory=RecipeTest)
    budget_minutes: float = 12.0
    """The time the recipe should take on 2 CPU cores; the report says when a run took longer."""
    jobs: int = 1
    """Experiments at once; the cores are split between them."""
    noise_floor: str = "noise_floor"
    """The recipe whose seed spread widens this one's intervals when it has fewer than 3 seeds."""
    scale: str = ""
    """The scale of the paper's evidence, against this run's: what a verdict here can and cannot say."""
    rounds: int = 40
    """test.kind speed: timed training steps of each arm."""

    def __post_init__(self):
        if self.control not in self.arms:
            raise ConfigError(f"control: {self.control!r} is not an arm; arms: {list(self.arms)}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"seeds: list distinct seeds, got {list(self.seeds)}")
        if self.test.kind == "noise_floor" and (len(self.arms) != 1 or len(self.seeds) < 3):
            raise ConfigError("test.kind noise_floor: one arm and at least 3 seeds")
        if self.test.kind != "noise_floor" and len(self.arms) < 2:
            raise ConfigError(f"test.kind {self.test.kind}: list the control and at least one other arm")
        if self.test.kind == "scaling" and (len(self.arms) < 6 or len(self.seeds) != 1 or self.model != "pretrain"):
            raise ConfigError(
                "test.kind scaling: a ladder of at least 5 sizes plus the control, the held-out target;"
                " one seed; model pretrain"
            )
        stray = sorted((set(self.models) | set(self.relative_to)) - set(self.arms))
        if stray:
            raise ConfigError(f"models, relative_to: {stray} are not arms; arms: {list(self.arms)}")
        if self.jobs < 1 or self.budget_minutes <= 0:
            raise ConfigError(f"jobs >= 1 and budget_minutes > 0; got {self.jobs}, {self.budget_minutes}")

    def windows_file(self, reports: str) -> str:
        """The per-window loss file the arms are paired on, under the repo's reports folder."""
        if self.windows:
            return self.windows
        stage = "evaluate" if "evaluate" in self.targets else self.model.partition("_")[0]
        return f"{reports}/{stage}_windows.parquet"

    @property
    def compared(self) -> list[str]:
        return [arm for arm in self.arms if arm != self.control]

    def overrides(self, arm: str, seed: int) -> dict[str, Scalar | list[Scalar]]:
        merged = self.base | self.arms[arm] | {self.seed_key: seed}
        return {key: list(v) if isinstance(v, tuple) else v for key, v in merged.items()}

    def model_of(self, arm: str) -> str:
        return self.models.get(arm, self.model)

    def quantity(self, arm: str) -> str:
        """What is compared for the arm: its model's val loss, less its reference model's when it has one."""
        reference = self.relative_to.get(arm)
        return self.model_of(arm) + (f" − {reference}" if reference else "")


def load_recipe(name: str, recipes: Path = RECIPES) -> Recipe:
    path = recipes / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in recipes.glob("*.yaml")))
        raise ConfigError(f"no recipe {name!r} in {recipes}; recipes: {known}")
    return load_as(Recipe, path)


def experiment_name(overrides: dict[str, object], targets: tuple[str, ...]) -> str:
    """What the experiment runs fixes its name: recipes sharing an arm share its experiments."""
    key = json.dumps({"overrides": overrides, "targets": list(targets)}, sort_keys=True)
    return "rcp-" + hashlib.sha1(key.encode()).hexdigest()[:10]


def read_windows(repo: str, rev: str, path: str, where: str) -> pd.DataFrame:
    """The per-window loss file (WINDOW_LOSSES) as the experiment at `rev` wrote it."""
    import dvc.api

    with dvc.api.open(path, repo=repo, rev=rev, mode="rb") as f:
        data = bytes_io.BytesIO(f.read())
    return tables.read_shard(data, tables.WINDOW_LOSSES, where=where)


def model_windows(df: pd.DataFrame, model: str, domain: str, where: str) -> np.ndarray:
    """The model's rows of a WINDOW_LOSSES table (those of `domain` only, unless ""), in window order."""
    df = df[(df["model"] == model) & ((df["domain"] == domain) if domain else True)].sort_values("window")
    if df.empty:
        of_domain = f" in domain {domain!r}" if domain else ""
        raise io.DataError(f"{where}: no windows of model {model!r}{of_domain}")
    return df["val_loss"].to_numpy()


def seed_spread(losses: dict[int, np.ndarray]) -> float:
    """The standard deviation of a run's mean val loss between seeds."""
    return float(np.std([w.mean() for w in losses.values()], ddof=1))


def interval(estimate: stats.Estimate) -> dict[str, float]:
    """An estimate as a recipe's result reports it."""
    return {
        "delta": estimate.mean,
        "half_width": estimate.half_width,
        "low": estimate.low,
        "high": estimate.high,
        "confidence": estimate.confidence,
    }


def compare_arm(recipe: Recipe, arm: str, losses: dict[tuple[str, int], np.ndarray], seed_sd: float | None) -> dict:
    """arm − control over the seeds: the estimate, its interval and the verdict."""
    test = recipe.test
    per_seed = []
    for seed in recipe.seeds:
        a, b = losses[arm, seed], losses[recipe.control, seed]
        if len(a) != len(b):
            raise ConfigError(
                f"arm {arm!r} scored {len(a)} val windows and {recipe.control!r} {len(b)} (seed {seed}): pairing"
                " needs the same windows; keep block_size, batch_size and val_batches equal across arms"
            )
        per_seed.append(stats.batch_means(a - b, test.confidence))
    estimate = stats.over_seeds(per_seed, test.confidence)
    widened = len(recipe.seeds) < 3 and test.kind != "exact"  # exact: the trained Δ is context, same seed and data
    if widened:
        if seed_sd is None:
            raise ConfigError(
                f"{len(recipe.seeds)} seeds leave seed-to-seed variance unmeasured: run the noise-floor recipe"
                f" first (python -m flows.recipe {recipe.noise_floor}), or list at least 3 seeds"
            )
        estimate = stats.with_noise_floor(estimate, seed_sd, len(recipe.seeds))
    kind = "equivalence" if test.kind == "equivalence" else "superiority"
    return {
        "arm": arm,
        **interval(estimate),
        "seeds": len(recipe.seeds),
        "windows": len(losses[arm, recipe.seeds[0]]),
        "noise_floor_sd": seed_sd if widened else None,
        "verdict": stats.verdict(estimate, kind, test.margin, test.direction),
        "val_loss": {str(seed): float(losses[arm, seed].mean()) for seed in recipe.seeds},
        "control_val_loss": {str(seed): float(losses[recipe.control, seed].mean()) for seed in recipe.seeds},
    }


MODEL_KEYS = {"pretrain": "pretrain.model.", "distill": "distill.student.", "scratch": "distill.student."}


@torch.no_grad()
def same_weights_difference(recipe: Recipe, arm: str, model_path: Path, val: np.ndarray) -> float:
    """The largest |logit difference| between the control's model and the same weights in the arm's architecture
    (the arm's model keys over the control's), on the first val windows."""
    from lm import model_dir
    from lm.gpt import GPT

    prefix = MODEL_KEYS.get(recipe.model)
    control, other = recipe.overrides(recipe.control, 0), recipe.overrides(arm, 0)
    changed = {k: v for k, v in other.items() if control.get(k) != v}
    if prefix is None or any(not k.startswith(prefix) for k in changed):
        raise ConfigError(
            f"test.kind exact: arm {arm!r} must differ from {recipe.control!r} in {prefix or 'model'}* keys only"
            f" (the same weights in two architectures); it differs in {sorted(changed)}"
        )
    model = model_dir.load(model_path)
    shape = dataclasses.replace(model.config, **{k.removeprefix(prefix): v for k, v in changed.items()})
    twin = GPT(shape).eval()
    twin.load_state_dict(model.state_dict())
    block = shape.block_size
    windows = torch.from_numpy(val[: 8 * block].astype(np.int64)).view(-1, block)
    return (model(windows) - twin(windows)).abs().max().item()


def spread(recipe: Recipe, result: dict) -> str:
    """The difference, its interval's half-width and what it rests on."""
    if recipe.test.kind == "speed":
        return f"Δ={result['delta']:+.1%} ± {result['half_width']:.1%} of the step time ({result['windows']} rounds)"
    text = (
        f"Δ={result['delta']:+.4f} ± {result['half_width']:.4f} nats"
        f" ({result['seeds']} seeds × {result['windows']} windows)"
    )
    if recipe.test.kind == "exact":
        return f"max |Δlogit|={result['max_logit_difference']:.1e} at the same weights; trained {text}"
    return text


def headline(name: str, recipe: Recipe, result: dict, seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    verdict = result["verdict"]
    return f"{name} [{result['arm']} − {recipe.control}]: {verdict} {spread(recipe, result)}, {minutes}m{secs:02d}s"


def overall(results: list[dict]) -> str:
    verdicts = {r["verdict"] for r in results}
    if verdicts == {"REPRODUCED"}:
        return "REPRODUCED"
    return "NOT REPRODUCED" if "NOT REPRODUCED" in verdicts else "INCONCLUSIVE"


ARM_COLUMN = {"speed": "step time", "scaling": "size and final val loss"}


def markdown(name: str, recipe: Recipe, summary: dict) -> str:
    test = recipe.test
    measured = "mean compared loss per seed" if recipe.relative_to else "mean val loss per seed"
    lines = [f"# Recipe: {name}", "", f"**Paper:** {recipe.paper}", "", f"**Claim:** {recipe.claim}", ""]
    if recipe.scale:
        lines += [f"**Scale:** {recipe.scale}", ""]
    minutes = summary["seconds"] / 60
    over = " (over budget)" if minutes > recipe.budget_minutes else ""
    lines += [
        f"**Verdict: {summary['verdict']}** in {minutes:.1f} min of a {recipe.budget_minutes:g}-minute budget{over};"
        + (
            f" {summary['reused']} of {summary['experiments']} experiments reused from earlier runs;"
            if summary["experiments"]
            else " timed in this process;"
        )
        + f" baseline commit {summary['commit'][:10]}.",
        "",
        f"Test: {test.kind}"
        + (f", {test.direction} by more than {test.margin:g} nats" if test.kind == "superiority" else "")
        + (f", within ±{test.margin:g} nats (TOST)" if test.kind == "equivalence" else "")
        + (f", max |Δlogit| ≤ {test.tolerance:g}" if test.kind == "exact" else "")
        + (
            f", steps {test.direction} by more than {test.margin:.0%} ({recipe.rounds} rounds)"
            if test.kind == "speed"
            else ""
        )
        + (
            "; compared: " + ", ".join(f"{arm}: `{recipe.quantity(arm)}`" for arm in recipe.arms)
            if recipe.models or recipe.relative_to
            else f"; model `{recipe.model}`"
        )
        + (f", the windows of domain `{recipe.domain}`" if recipe.domain else "")
        + f", targets {list(recipe.targets)}, seeds {list(recipe.seeds)} (as {recipe.seed_key}).",
        "",
        f"Base overrides: `{json.dumps(recipe.base)}`",
        "",
        f"| arm | overrides | {ARM_COLUMN.get(test.kind, measured)} | experiments |",
        "|---|---|---|---|",
    ]
    for arm, overrides in recipe.arms.items():
        if "step_ms" in summary:
            cell = f"{summary['step_ms'][arm]['mean']:.1f} ms per training step"
        elif "sizes" in summary:
            last = [p for p in summary["points"] if p["model"] == arm][-1]
            cell = f"N={summary['sizes'][arm]:,}: {last['val_loss']:.4f} after {last['tokens']:,.0f} tokens"
        else:
            cell = ", ".join(f"{v:.4f}" for v in summary["val_loss"][arm].values())
        names = ", ".join(summary["experiments_by_arm"][arm]) or "(timed in process)"
        lines.append(f"| {arm} | `{json.dumps(overrides)}` | {cell} | {names} |")
    if test.kind == "noise_floor":
        lines += ["", f"Seed-to-seed standard deviation of the mean val loss: **{summary['seed_sd']:.5f}** nats."]
        return "\n".join(lines) + "\n"
    if test.kind == "scaling":
        return "\n".join(lines + scaling_markdown(summary)) + "\n"
    lines += [
        "",
        f"| arm − control | {'Δ step time (fraction)' if test.kind == 'speed' else 'Δ val loss (nats)'} | interval"
        f" | {'rounds' if test.kind == 'speed' else 'windows'} × seeds | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for r in summary["comparisons"]:
        interval = f"[{r['low']:+.4f}, {r['high']:+.4f}] ({r['confidence']:.0%})"
        cells = [f"{r['arm']} − {recipe.control}", f"{r['delta']:+.4f}", interval, f"{r['windows']} × {r['seeds']}"]
        lines.append("| " + " | ".join(cells + [r["verdict"]]) + " |")
        if "max_logit_difference" in r:
            lines.append(f"| (same weights) | max \\|Δlogit\\| {r['max_logit_difference']:.2e} | | | |")
    floors = {r["noise_floor_sd"] for r in summary["comparisons"] if r["noise_floor_sd"] is not None}
    if floors:
        lines += [
            "",
            f"Fewer than 3 seeds: the interval adds the noise floor's seed-to-seed spread ({floors.pop():.5f} nats,"
            f" recipe `{recipe.noise_floor}`).",
        ]
    return "\n".join(lines) + "\n"


def log_runs(repo: Path, experiment: str, name: str, recipe: Recipe, summary: dict) -> str | None:
    """The MLflow parent run `recipe <name>` with one child run per arm; returns the parent's UI link."""
    try:
        import mlflow
        from mlflow.entities import Metric, Param

        experiment_id = tracking.use_experiment(mlflow, experiment, repo)
        client = mlflow.MlflowClient(tracking.tracking_uri(repo))
        tags = {"recipe": name, "verdict": summary["verdict"], "git_commit": summary["commit"]}
        parent = client.create_run(experiment_id, run_name=f"recipe {name}", tags=tags).info.run_id
        now = int(time.time() * 1000)
        params = {
            "paper": recipe.paper[:500],
            "claim": recipe.claim[:500],
            "test": json.dumps(dataclasses.asdict(recipe.test)),
        }
        metrics = {"seconds": summary["seconds"]} | ({"seed_sd": summary["seed_sd"]} if "seed_sd" in summary else {})
        for r in summary.get("comparisons", []):
            metrics |= {f"{r['arm']}.delta": r["delta"], f"{r['arm']}.half_width": r["half_width"]}
        if "laws" in summary:
            law = summary["laws"]["intermediate"]
            metrics |= {k: law[k] for k in ("E", "alpha", "beta")}
            metrics |= {f"target_error.{kind}": e for kind, e in summary["prediction_errors"].items()}
        client.log_batch(
            parent,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        comparisons = {r["arm"]: r for r in summary.get("comparisons", [])}
        for arm, overrides in recipe.arms.items():
            child_tags = {
                "mlflow.parentRunId": parent,
                "recipe": name,
                "arm": arm,
                "dvc_experiments": ",".join(summary["experiments_by_arm"][arm]),
            }
            child = client.create_run(experiment_id, run_name=arm, tags=child_tags).info.run_id
            arm_metrics = {f"val_loss.seed_{s}": v for s, v in summary.get("val_loss", {}).get(arm, {}).items()}
            arm_metrics |= {"step_ms": summary["step_ms"][arm]["mean"]} if "step_ms" in summary else {}
            if "sizes" in summary:
                last = [p for p in summary["points"] if p["model"] == arm][-1]
                arm_metrics |= {"non_embedding_params": summary["sizes"][arm], "val_loss": last["val_loss"]}
            if arm in comparisons:
                c = comparisons[arm]
                arm_metrics |= {"delta": c["delta"], "half_width": c["half_width"]}
            client.log_batch(
                child,
                metrics=[Metric(k, v, now, 0) for k, v in arm_metrics.items()],
                params=[Param(k, str(v)) for k, v in (recipe.base | overrides).items()],
            )
            client.set_terminated(child, "FINISHED")
        if "laws" in summary:
            import matplotlib.pyplot as plt

            figure = scaling_figure(summary)
            client.log_figure(parent, figure, f"{name}.png")
            plt.close(figure)
        client.set_terminated(parent, "FINISHED")
        return tracking.ui_link(experiment_id, parent)
    except Exception as e:  # noqa: BLE001 - the report stands without the runs
        get_run_logger().warning("recipe %s not logged to MLflow: %s", name, e)
        return None


def run_experiments(name: str, spec: Recipe, repo_path: Path, commit: str) -> tuple[dict, dict, dict]:
    """Every arm × seed as a DVC experiment on `commit`, the missing ones queued and run: ({(arm, seed): name},
    {name: its commit}, what the summary says of them)."""
    logger = get_run_logger()
    repo = str(repo_path)
    runs = {(arm, seed): spec.overrides(arm, seed) for arm in spec.arms for seed in spec.seeds}
    check_points(repo_path / "params.yaml", list(runs.values()))
    names = {key: experiment_name(overrides, spec.targets) for key, overrides in runs.items()}
    done = set(dvc(repo, "exp", "list", "--rev", commit, "--name-only").split())
    missing = {key: n for key, n in names.items() if n not in done}
    logger.info("recipe %s: %d experiments, %d already run on this commit", name, len(names), len(names) - len(missing))
    for experiment, key in {n: key for key, n in missing.items()}.items():  # arms may coincide: queue once
        queue_experiment(repo, experiment, runs[key], spec.targets)
    if missing:
        run_queue(repo, spec.jobs)
    revs = experiment_revs(json.loads(dvc(repo, "exp", "show", "--json", "--rev", commit)))
    failed = sorted({n for n in names.values() if n not in revs})
    if failed:
        raise RuntimeError(f"recipe {name}: experiments {failed} did not finish; see `dvc exp show` and its logs")
    summary = {
        "experiments": len(set(names.values())),
        "reused": len(set(names.values())) - len(set(missing.values())),
        "experiments_by_arm": {arm: [names[arm, s] for s in spec.seeds] for arm in spec.arms},
    }
    return names, revs, summary


def trained_arms(name: str, spec: Recipe, repo_path: Path, params, commit: str, seed_sd: float | None) -> dict:
    """The arms' experiments, paired window by window."""
    repo = str(repo_path)
    names, revs, summary = run_experiments(name, spec, repo_path, commit)
    windows = spec.windows_file(params.paths.reports)
    where = {n: f"{windows} of experiment {n}" for n in set(names.values())}
    files = {n: read_windows(repo, revs[n], windows, where[n]) for n in where}  # arms may share an experiment
    losses = {}
    for (arm, seed), n in names.items():
        losses[arm, seed] = model_windows(files[n], spec.model_of(arm), spec.domain, where[n])
        if arm in spec.relative_to:
            losses[arm, seed] = losses[arm, seed] - model_windows(
                files[n], spec.relative_to[arm], spec.domain, where[n]
            )
    summary["val_loss"] = {arm: {str(s): float(losses[arm, s].mean()) for s in spec.seeds} for arm in spec.arms}
    if spec.test.kind == "noise_floor":
        [arm] = spec.arms
        return summary | {"seed_sd": seed_spread({s: losses[arm, s] for s in spec.seeds}), "verdict": "MEASURED"}
    comparisons = [compare_arm(spec, arm, losses, seed_sd) for arm in spec.compared]
    if spec.test.kind == "exact":
        val = load_tokens(repo_path / params.paths.tokens, "val")
        model_path = params.models()[spec.model]
        for r in comparisons:
            with tempfile.TemporaryDirectory() as tmp:
                fetch_dir(repo, revs[names[spec.control, spec.seeds[0]]], model_path, Path(tmp))
                r["max_logit_difference"] = same_weights_difference(spec, r["arm"], Path(tmp), val)
            ok = r["max_logit_difference"] <= spec.test.tolerance
            r["verdict"] = "REPRODUCED" if ok else "NOT REPRODUCED"
    return summary | {"comparisons": comparisons, "verdict": overall(comparisons)}


def val_curve(repo: str, rev: str, path: str, experiment: str) -> list[dict]:
    """The experiment's val curve (step, val_loss, tokens), as its training stage wrote it."""
    import csv

    import dvc.api

    with dvc.api.open(path, repo=repo, rev=rev) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise io.DataError(f"{path} of experiment {experiment}: no validations")
    return rows


def non_embedding_params(spec: Recipe, arm: str, repo_path: Path) -> int:
    """N of the arm's model: its parameters less the token and position embeddings (Kaplan et al.)."""
    arm_params = parse_params(merge(read_yaml(repo_path / "params.yaml"), unflatten(spec.overrides(arm, 0))))
    model = new_model(arm_params.pretrain.model, repo_path / arm_params.paths.tokens, 0)
    embeddings = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    return sum(p.numel() for p in model.parameters()) - embeddings


def scaled_arms(name: str, spec: Recipe, repo_path: Path, params, commit: str, seed_sd: float | None) -> dict:
    """The ladder's experiments, the two fits, their predictions of the held-out target."""
    names, revs, summary = run_experiments(name, spec, repo_path, commit)
    seed = spec.seeds[0]
    path = f"{params.paths.plots}/pretrain_val.csv"
    curves = {arm: val_curve(str(repo_path), revs[names[arm, seed]], path, names[arm, seed]) for arm in spec.arms}
    sizes = {arm: non_embedding_params(spec, arm, repo_path) for arm in spec.arms}
    return summary | judge_ladder(spec, curves, sizes, seed_sd)


def judge_ladder(spec: Recipe, curves: dict[str, list[dict]], sizes: dict[str, int], seed_sd: float | None) -> dict:
    """Both fits on the ladder's val curves, and which predicts the held-out target better."""
    ladder = [arm for arm in spec.arms if arm != spec.control]
    every = [(sizes[arm], row["tokens"], row["val_loss"]) for arm in ladder for row in curves[arm]]
    final = [(sizes[arm], curves[arm][-1]["tokens"], curves[arm][-1]["val_loss"]) for arm in ladder]
    laws = {
        "intermediate": scaling.fit(*zip(*every, strict=True)),
        "final_only": scaling.fit(*zip(*final, strict=True)),
    }
    target = curves[spec.control][-1]
    n_target, d_target = sizes[spec.control], target["tokens"]
    errors = {kind: float(law.loss(n_target, d_target) - target["val_loss"]) for kind, law in laws.items()}
    gain = abs(errors["final_only"]) - abs(errors["intermediate"])
    margin = seed_sd if seed_sd is not None else spec.test.margin
    verdict = "REPRODUCED" if gain > margin else "NOT REPRODUCED" if gain < -margin else "INCONCLUSIVE"
    flops = 6 * n_target * d_target
    optimal = {f"{factor}x": laws["intermediate"].compute_optimal(factor * flops) for factor in (1, 10, 100)}
    points = [
        {"model": arm, "N": sizes[arm], "tokens": row["tokens"], "val_loss": row["val_loss"]}
        | {f"fit_{kind}": float(law.loss(sizes[arm], row["tokens"])) for kind, law in laws.items()}
        for arm in spec.arms
        for row in curves[arm]
    ]
    return {
        "sizes": sizes,
        "points": points,
        "laws": {kind: law.as_dict() for kind, law in laws.items()},
        "ranges": scaling.leave_one_size_out(*zip(*every, strict=True)),
        "target": {"arm": spec.control, "N": n_target, "tokens": d_target, "val_loss": target["val_loss"]},
        "prediction_errors": errors,
        "margin": margin,
        "compute_optimal": {k: {"N": n, "tokens": d} for k, (n, d) in optimal.items()},
        "verdict": verdict,
    }


def scaling_markdown(summary: dict) -> list[str]:
    law, final, ranges = summary["laws"]["intermediate"], summary["laws"]["final_only"], summary["ranges"]
    target, errors = summary["target"], summary["prediction_errors"]
    lines = [
        "",
        "| fit | E | A | α | B | β | error on the target (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, fitted in (("every intermediate validation", law), ("final losses only", final)):
        key = "intermediate" if kind.startswith("every") else "final_only"
        cells = [f"{fitted[k]:.4g}" for k in ("E", "A", "alpha", "B", "beta")]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {errors[key]:+.4f} |")
    lines += [
        "",
        f"Leave-one-size-out ranges of the intermediate fit: E {ranges['E'][0]:.3f}–{ranges['E'][1]:.3f},"
        f" α {ranges['alpha'][0]:.3f}–{ranges['alpha'][1]:.3f}, β {ranges['beta'][0]:.3f}–{ranges['beta'][1]:.3f}.",
        "",
        f"Held-out target `{target['arm']}`: N = {target['N']:,} non-embedding parameters, D = {target['tokens']:,.0f}"
        f" tokens, val loss {target['val_loss']:.4f}. The intermediate fit counts as the better predictor only when"
        f" its error is smaller by more than {summary['margin']:.4f} nats (the noise floor's seed spread).",
        "",
        "Compute-optimal split by the intermediate fit (C = 6·N·D, C₀ the target's training FLOPs):",
        "",
        "| C | N* | D* |",
        "|---|---:|---:|",
    ]
    for factor, split in summary["compute_optimal"].items():
        lines.append(f"| {factor} C₀ | {split['N']:,.0f} | {split['tokens']:,.0f} |")
    return lines


def write_points(points: list[dict], path: Path) -> None:
    """The scaling recipe's points and both fits, a DVC plot."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)


def scaling_figure(summary: dict):
    """Val loss against tokens for every size: the validations and both fits' curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm in summary["sizes"]:
        rows = [p for p in summary["points"] if p["model"] == arm]
        tokens = [p["tokens"] for p in rows]
        line = axes.plot(tokens, [p["val_loss"] for p in rows], "o", label=f"{arm} (N={summary['sizes'][arm]:,})")
        axes.plot(tokens, [p["fit_intermediate"] for p in rows], "-", color=line[0].get_color())
        axes.plot(tokens, [p["fit_final_only"] for p in rows], ":", color=line[0].get_color())
    axes.set(
        xscale="log", xlabel="training tokens", ylabel="val loss (nats)", title="fit: intermediate (—), final only (⋯)"
    )
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def timed_arms(spec: Recipe, repo_path: Path, params) -> dict:
    """test.kind speed: each arm's model trained step by step in this process, the arms taking turns, and the
    arm's step time relative to the control's judged over the rounds."""
    base = read_yaml(repo_path / "params.yaml")
    models, batch = {}, None
    for arm in spec.arms:
        arm_params = parse_params(merge(base, unflatten(spec.overrides(arm, spec.seeds[0]))))
        shape, train = arm_params.pretrain.model, arm_params.pretrain.train
        models[arm] = new_model(shape, repo_path / params.paths.tokens, spec.seeds[0])
        if batch is None:
            tokens = load_tokens(repo_path / params.paths.tokens, "train")
            size = train.batch_size * (shape.block_size + 1)
            batch = torch.from_numpy(tokens[:size].astype(np.int64)).view(train.batch_size, -1)
    seconds = interleaved_step_seconds(models, batch, spec.rounds)
    comparisons = []
    for arm in spec.compared:
        relative = seconds[arm] / seconds[spec.control] - 1
        estimate = stats.batch_means(relative, spec.test.confidence)
        result = {
            "arm": arm,
            **interval(estimate),
            "seeds": 1,
            "windows": spec.rounds,
            "noise_floor_sd": None,
            "verdict": stats.verdict(estimate, "superiority", spec.test.margin, spec.test.direction),
        }
        comparisons.append(result)
    step_ms = {arm: {"mean": float(t.mean() * 1e3)} for arm, t in seconds.items()}
    summary = {"experiments": 0, "reused": 0, "experiments_by_arm": {arm: [] for arm in spec.arms}}
    return summary | {"step_ms": step_ms, "comparisons": comparisons, "verdict": overall(comparisons)}


def interleaved_step_seconds(models: dict, batch: torch.Tensor, rounds: int, warmup: int = 3) -> dict:
    """Seconds of one training step (forward, backward, AdamW) of each model over `rounds` rounds, the models
    taking turns within each round, in alternating order, so that the machine's drifts fall on all of them."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    x, y = batch[:, :-1], batch[:, 1:]
    seconds = {name: [] for name in models}
    order = list(models)
    for r in range(warmup + rounds):
        for name in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            loss = models[name].loss(x, y)  # the training stages' loss path
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if r >= warmup:
                seconds[name].append(time.perf_counter() - t0)
    return {name: np.array(values) for name, values in seconds.items()}


@flow(name="recipe", flow_run_name="recipe {name}")
def recipe(name: str, repo: str = ".") -> dict:
    """Run recipes/<name>.yaml; returns its summary (also metrics/recipes/<name>.json)."""
    started = time.perf_counter()
    repo_path = Path(repo).resolve()
    spec = load_recipe(name, repo_path / "recipes")
    params = load_params(repo_path / "params.yaml")
    commit = tracking.git_commit(repo_path)  # the baseline: HEAD may move while the experiments run
    summary = {"recipe": name, "commit": commit}
    floor_file = repo_path / params.paths.metrics / "recipes" / f"{spec.noise_floor}.json"
    seed_sd = json.loads(floor_file.read_text())["seed_sd"] if floor_file.exists() else None
    if spec.test.kind == "speed":
        summary |= timed_arms(spec, repo_path, params)
    elif spec.test.kind == "scaling":
        summary |= scaled_arms(name, spec, repo_path, params, commit, seed_sd)
        write_points(summary["points"], repo_path / params.paths.plots / "recipes" / f"{name}.csv")
    else:
        summary |= trained_arms(name, spec, repo_path, params, commit, seed_sd)
    summary["seconds"] = time.perf_counter() - started
    summary["budget_seconds"] = spec.budget_minutes * 60
    io.write_json(repo_path / params.paths.metrics / "recipes" / f"{name}.json", summary)
    text = markdown(name, spec, summary)
    report = repo_path / params.paths.reports / "recipes" / f"{name}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(report) as tmp:
        tmp.write_text(text)
    link = log_runs(repo_path, params.run.experiment, name, spec, summary)
    mlflow_line = f"\n\n[The recipe's runs in MLflow]({link})" if link else ""
    create_markdown_artifact(text + mlflow_line, key=f"recipe-{name.replace('_', '-')}", description=spec.claim[:200])
    for r in summary.get("comparisons", []):
        print(headline(name, spec, r, summary["seconds"]), flush=True)
    if spec.test.kind == "scaling":
        errors, law = summary["prediction_errors"], summary["laws"]["intermediate"]
        print(
            f"{name}: {summary['verdict']} target error {errors['intermediate']:+.4f} (intermediate fit) vs"
            f" {errors['final_only']:+.4f} nats (final only); alpha {law['alpha']:.3f}, beta {law['beta']:.3f},"
            f" E {law['E']:.3f}, {summary['seconds'] / 60:.1f} min",
            flush=True,
        )
    if spec.test.kind == "noise_floor":
        print(f"{name}: seed sd {summary['seed_sd']:.5f} nats ({len(spec.seeds)} seeds)", flush=True)
    return summary


def experiment_revs(shown: list[dict]) -> dict[str, str]:
    """Experiment name -> its commit, from `dvc exp show --json` (failed and queued ones left out)."""
    revs = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev.get("name") and not rev.get("error") and (rev.get("data") or {}).get("status") != "Failed":
                    revs[rev["name"]] = rev["rev"]
    return revs


def fetch_dir(repo: str, rev: str, path: str, dest: Path) -> None:
    """A DVC-tracked folder as the commit `rev` has it, copied to dest."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(repo, rev=rev)
    for remote_path in fs.find(path):
        local = dest / Path(remote_path).relative_to(Path("/", path) if remote_path.startswith("/") else path)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote_path, str(local))


def results_table(root: Path = ROOT) -> str:
    """Every shipped recipe's last result (metrics/recipes/<name>.json) as one markdown table, the README's."""
    metrics = root / load_params(root / "params.yaml").paths.metrics / "recipes"
    lines = ["| recipe | paper | verdict | numbers | time |", "|---|---|---|---|---|"]
    for path in sorted((root / "recipes").glob("*.yaml")):
        spec, result_file = load_as(Recipe, path), metrics / f"{path.stem}.json"
        if not result_file.exists():
            lines.append(f"| {path.stem} | {spec.paper} | not run | | |")
            continue
        summary = json.loads(result_file.read_text())
        if spec.test.kind == "noise_floor":
            numbers = f"seed sd {summary['seed_sd']:.4f} nats ({len(spec.seeds)} seeds)"
        elif spec.test.kind == "scaling":
            errors, law = summary["prediction_errors"], summary["laws"]["intermediate"]
            numbers = (
                f"held-out target's error {errors['intermediate']:+.3f} nats (fit on every validation) vs"
                f" {errors['final_only']:+.3f} (final losses only); α {law['alpha']:.2f}, β {law['beta']:.2f}"
            )
        else:
            numbers = "; ".join(
                f"{r['arm']} − {spec.control}: {spread(spec, r)}"
                + (f" ({r['verdict']})" if len(summary["comparisons"]) > 1 else "")
                for r in summary["comparisons"]
            )
        minutes, secs = divmod(round(summary["seconds"]), 60)
        reused = f" ({summary['reused']} of {summary['experiments']} runs reused)" if summary.get("reused") else ""
        link = f"[{path.stem}](reports/recipes/{path.stem}.md)"
        numbers = numbers.replace("|", "\\|")  # a table cell
        time = f"{minutes}m{secs:02d}s{reused}"
        lines.append(f"| {link} | {spec.paper} | {summary['verdict']} | {numbers} | {time} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a file name in recipes/, without .yaml")
    parser.add_argument("--table", action="store_true", help="print every recipe's last result as a markdown table")
    args = parser.parse_args()
    if args.table:
        print(results_table())
        return
    if not args.name:
        parser.error("name a recipe, or give --table")
    from flows.server import require_api

    try:
        load_recipe(args.name)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    require_api()
    recipe(args.name)


if __name__ == "__main__":
    main()
