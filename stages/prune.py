"""prune: one pruned copy of prune.source per method in prune.methods (lm/prune.py), optionally recovered by
training with the zeros held.

Writes one model directory per method (zeros stored in the weights; removed layers are gone from the config) and
reports/prune_windows.parquet: the source's and each pruned model's val loss per window, on the windows recovery
training validates on, so experiments pair window by window (flows/recipe.py). Metrics, per method: the target and
measured sparsity, parameters (all, non-zero), the val loss, and the val loss after recovery. In MLflow, each
recovery's training curve is a child run of the stage's, named prune_<method>.
"""

import functools
import logging
from pathlib import Path

import torch

from lm import calibrate, io, model_dir, prune, sparse, tables
from lm.gpt import GPT
from lm.scoring import domain_losses, sequential_loader, window_domains, window_losses
from lm.tokens import load_tokens
from stages import cli, cost
from stages.config import Params, PruneConfig
from stages.tracking import Tracker, git_commit

log = logging.getLogger("stages.prune")


def pruned(model: GPT, method: str, cfg: PruneConfig, batches: list[torch.Tensor]) -> GPT:
    if method == "magnitude":
        prune.magnitude_prune(model, cfg.sparsity, cfg.scope)
    elif method == "wanda":
        prune.wanda_prune(model, cfg.sparsity, batches)
    elif method == "nm":
        prune.nm_prune(model, cfg.n, cfg.m, batches)
    elif method == "heads":
        prune.prune_heads(model, cfg.sparsity, batches)
    elif method == "neurons":
        prune.prune_neurons(model, cfg.sparsity, batches)
    elif method == "layers":
        model = prune.drop_layers(model, cfg.sparsity, batches)
    return model  # dense: as it came


def target_sparsity(method: str, cfg: PruneConfig) -> float | None:
    """The fraction of the blocks' weights an unstructured method must leave at zero; None for the structured
    ones, whose removed fraction is of heads, neurons or layers."""
    return {"magnitude": cfg.sparsity, "wanda": cfg.sparsity, "nm": 1 - cfg.n / cfg.m}.get(method)


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.prune, params.paths
    phases = cost.Phases()
    source = params.models()[cfg.source]
    block_size = model_dir.read_config(source)["model"]["block_size"]
    with phases("source"):  # its calibration batches and its val loss on recovery's windows
        batches = calibrate.calibration_batches(load_tokens(paths.tokens, "train"), block_size, cfg.calibration_samples)
        recovery = cfg.recovery
        val_tokens = recovery.val_batches * recovery.batch_size * block_size  # the windows recovery validates on
        val = sequential_loader(load_tokens(paths.tokens, "val"), block_size, recovery.batch_size, val_tokens)
        losses = {cfg.source: window_losses(model_dir.load(source), val).numpy()}
        domains = window_domains(paths.tokens, block_size, len(losses[cfg.source]))
    results = {}
    with io.atomic_dir(paths.model("prune")) as out:
        for method in cfg.methods:
            with phases("prune"):
                model = pruned(model_dir.load(source), method, cfg, batches)
            metrics = {"sparsity_before_recovery": model_dir.sparsity(model)}
            if method in cfg.recover and cfg.recovery.max_steps:
                name = f"prune_{method}"  # its recovery curve: a child run, beside the other training curves
                tracker.start_child(name, params.model_tags(name))
                curve = functools.partial(tracker.log_metrics, child=name)
                seed = params.run.seed if cfg.seed is None else cfg.seed
                with phases("recovery"):
                    metrics["val_loss_after_recovery"] = prune.recover(model, recovery, paths.tokens, seed, curve)
            card = {
                "name": f"prune_{method}",
                "description": f"{method} pruning of {cfg.source}"
                + (" with recovery training." if "val_loss_after_recovery" in metrics else "."),
                "source": source,
                "git_commit": git_commit(),
            }
            with phases("save_and_score"):
                model_dir.save(model, out / method, Path(source) / model_dir.TOKENIZER, card)
                saved = model_dir.load(out / method)  # measured from the file, not the model in memory
                losses[f"prune_{method}"] = window_losses(saved, val).numpy()
            metrics |= {"val_loss": float(losses[f"prune_{method}"].mean())}
            metrics |= domain_losses(losses[f"prune_{method}"], domains)
            metrics |= {"sparsity": model_dir.sparsity(saved), "n_layer": saved.config.n_layer}
            metrics |= dict(zip(("params", "nonzero_params"), model_dir.param_counts(saved), strict=True))
            target = target_sparsity(method, cfg)
            if target is not None and abs(metrics["sparsity"] - target) > 0.01:
                raise io.DataError(f"{out / method}: saved sparsity {metrics['sparsity']:.4f}, expected {target}")
            if method == "nm" and not all(sparse.is_n_m(m.weight, cfg.n, cfg.m) for m in prune.prunable(saved)):
                raise io.DataError(f"{out / method}: saved weights break the {cfg.n}:{cfg.m} pattern")
            log.info("prune %s: %s", method, {k: round(v, 4) for k, v in metrics.items()})
            results[method] = metrics
    tables.write_window_losses(losses, dict.fromkeys(losses, domains), Path(paths.reports) / "prune_windows.parquet")
    return results | {cost.PHASES: phases}


if __name__ == "__main__":
    cli.main(run)
