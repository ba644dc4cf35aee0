"""prune: zero the smallest-magnitude weights of the student's Linear layers.

Inputs:  ${paths.student_model}
Outputs: ${paths.pruned_model} (zeros stored in the weights; sparsity re-measured from the saved file)
Metrics: ${paths.metrics}/prune.json: target and measured sparsity
"""

import logging
from pathlib import Path

import torch

from lm import model_dir
from lm.gpt import GPT
from stages import io
from stages.cli import stage_main
from stages.config import Paths, PruneConfig
from stages.tracking import git_commit

log = logging.getLogger("stages.prune")


def prunable(model: GPT) -> list[torch.nn.Linear]:
    """The blocks' Linear layers; embeddings and the tied head are kept dense."""
    return [m for m in model.h.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def magnitude_prune(model: GPT, sparsity: float, scope: str) -> None:
    """Zero the `sparsity` fraction of smallest |w|: per matrix (scope=layer) or under one global threshold."""
    layers = prunable(model)
    if scope == "global":
        scores = torch.cat([m.weight.abs().flatten() for m in layers])
        k = int(sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k else -1.0
        for m in layers:
            m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        return
    for m in layers:
        k = int(sparsity * m.weight.numel())
        if k:
            drop = m.weight.abs().flatten().topk(k, largest=False).indices
            m.weight.view(-1)[drop] = 0.0


def run(cfg: PruneConfig, paths: Paths) -> dict:
    model = model_dir.load(paths.student_model)
    magnitude_prune(model, cfg.sparsity, cfg.scope)
    card = {
        "name": "prune",
        "description": f"{cfg.method} pruning of the student to {cfg.sparsity:.0%} sparsity.",
        "source": paths.student_model,
        "scope": cfg.scope,
        "git_commit": git_commit(),
    }
    with io.atomic_dir(paths.pruned_model) as tmp:
        model_dir.save(model, tmp, Path(paths.student_model) / model_dir.TOKENIZER, card)
        saved = model_dir.sparsity(model_dir.load(tmp))
    if abs(saved - cfg.sparsity) > 0.01:
        raise io.DataError(
            f"{paths.pruned_model}: saved sparsity {saved:.4f} differs from prune.sparsity {cfg.sparsity}"
        )
    log.info("prune: %.1f%% of the blocks' weights are zero", 100 * saved)
    return {"target_sparsity": cfg.sparsity, "sparsity": saved}


def main() -> None:
    stage_main(
        "prune",
        lambda p, tracker: run(p.prune, p.paths),
        inputs=lambda p: [p.student_model],
        artifacts=lambda p: model_dir.card_files(p.pruned_model),
    )


if __name__ == "__main__":
    main()
