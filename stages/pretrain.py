"""pretrain: train the base GPT on the train tokens with Lightning.

Writes the model directory (with a transformers export where the architecture maps onto one), the loss curve,
and metrics: final train and val loss, tokens/s, parameters.
"""

import logging
from pathlib import Path

from lm.lit import LitGPT
from lm.train import new_model, train_and_save
from stages import cli
from stages.config import Params
from stages.tracking import Tracker, git_commit

log = logging.getLogger("stages.pretrain")


def run(params: Params, tracker: Tracker) -> dict | None:
    cfg, paths = params.pretrain, params.paths
    model = new_model(cfg.model, paths.tokens, params.run.seed)
    log.info("pretrain: %.2fM parameters, %s", model.num_params() / 1e6, model.config)
    card = {"name": "pretrain", "description": "Base GPT pretrained on the curated corpus.", "git_commit": git_commit()}
    return train_and_save(
        LitGPT(model, cfg.train),
        cfg.train,
        paths.tokens,
        params.run.seed,
        out_dir=paths.models.pretrain,
        curve=Path(paths.plots) / "pretrain_loss.csv",
        card=card,
        on_log=tracker.log_metrics,
        ckpt_dir=Path(paths.checkpoints) / "pretrain",
    )


if __name__ == "__main__":
    cli.main(run)
