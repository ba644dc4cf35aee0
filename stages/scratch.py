"""scratch: the control for distill: the student's shape, initial weights, tokens and training, without a teacher.

Evaluate puts it next to the distilled student, so what distillation buys is a measured number.

Inputs:  ${paths.tokens}
Outputs: ${paths.scratch_model}
Metrics: ${paths.metrics}/scratch.json; plots: ${paths.plots}/scratch_loss.csv
"""

from lm import model_dir
from lm.lit import LitGPT
from stages.cli import stage_main
from stages.config import DistillConfig, Paths
from stages.distill import new_student
from stages.pretrain import optim_config, train_and_save
from stages.tracking import StageRun


def run(cfg: DistillConfig, paths: Paths, seed: int, tracker: StageRun | None = None) -> dict | None:
    student = new_student(cfg, paths, seed)
    module = LitGPT(student, optim_config(cfg.train), compile=cfg.train.compile)
    card = {"description": "The distill student's shape trained from scratch on the same tokens (the control)."}
    return train_and_save("scratch", module, cfg.train, paths, seed, tracker, paths.scratch_model, card)


def main() -> None:
    stage_main(
        "scratch",
        lambda p, tracker: run(p.distill, p.paths, p.run.seed, tracker),
        inputs=lambda p: [p.tokens],
        artifacts=lambda p: [f"{p.plots}/scratch_loss.csv", *model_dir.card_files(p.scratch_model)],
        models=lambda p: ["scratch"],
        system_metrics=True,
        section="distill",
    )


if __name__ == "__main__":
    main()
