"""distill: train a smaller student on the teacher's soft targets (KL at temperature T) and the data.

Inputs:  ${paths.base_model} (the teacher), ${paths.tokens}
Outputs: ${paths.student_model}
Metrics: ${paths.metrics}/distill.json; plots: ${paths.plots}/distill_loss.csv
"""

import logging
from pathlib import Path

import lightning as L

from lm import model_dir
from lm.gpt import GPT
from lm.lit import LitDistill
from stages import io
from stages.cli import stage_main
from stages.config import DistillConfig, Paths
from stages.pretrain import fit, optim_config, resolve_shape, save_trained, write_curve
from stages.tracking import StageRun

log = logging.getLogger("stages.distill")


def run(cfg: DistillConfig, paths: Paths, seed: int, tracker: StageRun | None = None) -> dict | None:
    L.seed_everything(seed, verbose=False)
    teacher = model_dir.load(paths.base_model)
    shape = resolve_shape(cfg.student, paths.tokens)
    if shape.vocab_size != teacher.config.vocab_size or shape.block_size > teacher.config.block_size:
        raise io.DataError(
            f"distill.student: vocab {shape.vocab_size} and block_size {shape.block_size} must match "
            f"the teacher's vocab {teacher.config.vocab_size} and not exceed its block_size "
            f"{teacher.config.block_size}"
        )
    student = GPT(shape)
    log.info("distill: student %.2fM parameters, teacher %.2fM", student.num_params() / 1e6, teacher.num_params() / 1e6)
    module = LitDistill(student, teacher, optim_config(cfg.train), cfg.alpha, cfg.temperature, cfg.train.compile)
    teacher_id = {"teacher": model_dir.weights_digest(paths.base_model), "alpha": cfg.alpha, "temp": cfg.temperature}
    ckpt_dir = Path(paths.checkpoints) / "distill"
    result = fit(module, cfg.train, paths.tokens, seed, tracker, ckpt_dir, run_identity=teacher_id)
    if result is None:
        return None  # another rank of a distributed run: rank zero writes the outputs
    write_curve(result.pop("history"), Path(paths.plots) / "distill_loss.csv")
    card = {
        "name": "distill",
        "description": "Student distilled from the pretrain model.",
        "teacher": paths.base_model,
        "data": paths.tokens,
        "parameters": student.num_params(),
        "val_loss": round(result["val_loss"], 4),
    }
    save_trained(student, paths.student_model, paths, card)
    return result | {"parameters": student.num_params()}


def main() -> None:
    stage_main(
        "distill",
        lambda p, tracker: run(p.distill, p.paths, p.run.seed, tracker),
        inputs=lambda p: [p.base_model, p.tokens],
        artifacts=lambda p: [f"{p.plots}/distill_loss.csv", *model_dir.card_files(p.student_model)],
        models=lambda p: {"distill": p.student_model},
        system_metrics=True,
    )


if __name__ == "__main__":
    main()
