"""pretrain: train the base GPT on the train tokens with Lightning.

Writes the model directory (with a transformers export where the architecture maps onto one), the loss curve,
and metrics: final train and val loss, tokens/s, parameters.
"""

from pathlib import Path

from lm.train import train_new
from stages import cli
from stages.config import Params
from stages.tracking import Tracker, git_commit


def run(params: Params, tracker: Tracker) -> dict | None:
    cfg, paths = params.pretrain, params.paths
    continued = f", continued from {cfg.init_from}" if cfg.init_from else ""
    description = f"Base GPT pretrained on the curated corpus{continued}."
    card = {"name": "pretrain", "description": description, "git_commit": git_commit()}
    return train_new(
        cfg.model,
        cfg.train,
        paths.tokens,
        params.run.seed,
        init_from=cfg.init_from,
        out_dir=paths.model("pretrain"),
        curve=Path(paths.plots) / "pretrain_loss.csv",
        val_curve=Path(paths.plots) / "pretrain_val.csv",
        windows=Path(paths.reports) / "pretrain_windows.parquet",
        card=card,
        on_log=tracker.log_metrics,
        ckpt_dir=paths.checkpoint_dir("pretrain"),
    )


if __name__ == "__main__":
    cli.main(run)
