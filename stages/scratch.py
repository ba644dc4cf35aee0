"""scratch: the control for distill: the student's shape, initial weights, tokens and training, without a teacher.

Evaluate puts it next to the distilled student, so what distillation buys is a measured number. Writes the model
directory, the loss curve and the same metrics as pretrain.
"""

from pathlib import Path

from lm.train import train_new
from stages import cli
from stages.config import Params
from stages.tracking import Tracker, git_commit


def run(params: Params, tracker: Tracker) -> dict | None:
    cfg, paths = params.distill, params.paths
    card = {
        "name": "scratch",
        "description": "The distill student's shape trained from scratch on the same tokens (the control).",
        "git_commit": git_commit(),
    }
    return train_new(
        cfg.student,
        cfg.train,
        paths.tokens,
        params.run.seed,
        out_dir=paths.model("scratch"),
        curve=Path(paths.plots) / "scratch_loss.csv",
        val_curve=Path(paths.plots) / "scratch_val.csv",
        windows=Path(paths.reports) / "scratch_windows.parquet",
        card=card,
        on_log=tracker.log_metrics,
        ckpt_dir=paths.checkpoint_dir("scratch"),
    )


if __name__ == "__main__":
    cli.main(run)
