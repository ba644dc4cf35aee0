"""distill: train a smaller student on the pretrained model's soft targets (KL at temperature T) and the data,
optionally also on its last hidden states and attention relations (MiniLM-v2); see lm/distill.py.

Writes the student's model directory, the loss curve and the same metrics as pretrain.
"""

import dataclasses
import logging
from pathlib import Path

from lm import io, model_dir
from lm.distill import LitDistill, init_from_teacher, teacher_topk_cache
from lm.train import new_model, train_and_save
from stages import cli
from stages.config import Params
from stages.tracking import Tracker, git_commit

log = logging.getLogger("stages.distill")


def run(params: Params, tracker: Tracker) -> dict | None:
    cfg, paths, seed = params.distill, params.paths, params.run.seed
    student = new_model(cfg.student, paths.tokens, seed)
    teacher_dir = paths.model("pretrain")
    teacher = model_dir.load(teacher_dir)
    shape = student.config
    if shape.vocab_size != teacher.config.vocab_size or shape.block_size > teacher.config.block_size:
        raise io.DataError(
            f"distill.student: vocab {shape.vocab_size} and block_size {shape.block_size} must match "
            f"the teacher's vocab {teacher.config.vocab_size} and not exceed its block_size "
            f"{teacher.config.block_size}"
        )
    if cfg.init_from_teacher:
        init_from_teacher(student, teacher)
    log.info("distill: student %.2fM parameters, teacher %.2fM", student.num_params() / 1e6, teacher.num_params() / 1e6)
    module = LitDistill(
        student, teacher, cfg.train, cfg.alpha, cfg.temperature, cfg.hidden_weight, cfg.attention_weight
    )
    teacher_logits = None
    if cfg.teacher_topk:
        root = paths.cache_dir("distill") / "teacher-topk"  # memory-mapped: on this machine
        teacher_logits = teacher_topk_cache(
            teacher, teacher_dir, paths.tokens, root, cfg.train, cfg.teacher_topk, seed, shape.block_size
        )
    fingerprint = {"teacher": model_dir.weights_digest(teacher_dir), "distill": dataclasses.asdict(cfg)}
    card = {
        "name": "distill",
        "description": "Student distilled from the pretrain model.",
        "teacher": teacher_dir,
        "git_commit": git_commit(),
    }
    return train_and_save(
        module,
        cfg.train,
        paths.tokens,
        seed,
        out_dir=paths.model("distill"),
        curve=Path(paths.plots) / "distill_loss.csv",
        val_curve=Path(paths.plots) / "distill_val.csv",
        windows=Path(paths.reports) / "distill_windows.parquet",
        card=card,
        on_log=tracker.log_metrics,
        ckpt_dir=paths.checkpoint_dir("distill"),
        fingerprint=fingerprint,
        teacher_logits=teacher_logits,
    )


if __name__ == "__main__":
    cli.main(run)
