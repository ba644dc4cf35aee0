"""distill: train a smaller student on the teacher's soft targets (KL at temperature T) and the data, optionally
also on its last hidden states and attention relations (MiniLM-v2).

Inputs:  ${paths.base_model} (the teacher), ${paths.tokens}
Outputs: ${paths.student_model}
Metrics: ${paths.metrics}/distill.json; plots: ${paths.plots}/distill_loss.csv
"""

import dataclasses
import logging

import lightning as L

from lm import model_dir
from lm.gpt import GPT
from lm.lit import LitDistill
from stages import io
from stages.cli import stage_main
from stages.config import DistillConfig, Paths
from stages.pretrain import optim_config, resolve_shape, train_and_save
from stages.tracking import StageRun

log = logging.getLogger("stages.distill")


def new_student(cfg: DistillConfig, paths: Paths, seed: int) -> GPT:
    """The student's initial weights: the same for distill and its from-scratch control (stages/scratch.py)."""
    L.seed_everything(seed, verbose=False)
    return GPT(resolve_shape(cfg.student, paths.tokens))


def init_from_teacher(student: GPT, teacher: GPT) -> None:
    """Copy the teacher's embeddings, final norm and evenly spaced blocks (first and last included)."""
    if dataclasses.replace(teacher.config, n_layer=student.config.n_layer) != student.config:
        raise io.DataError(
            "distill.init_from_teacher: the student may differ from the teacher only in n_layer; "
            f"student {student.config}, teacher {teacher.config}"
        )
    n_student, n_teacher = student.config.n_layer, teacher.config.n_layer
    chosen = [round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)]
    teacher_state = teacher.state_dict()
    state = {k: v for k, v in teacher_state.items() if not k.startswith("h.")}
    for i, j in enumerate(chosen):
        prefix = f"h.{j}."
        state |= {f"h.{i}.{k[len(prefix) :]}": v for k, v in teacher_state.items() if k.startswith(prefix)}
    student.load_state_dict(state)
    log.info("distill: student blocks initialized from teacher blocks %s", chosen)


def run(cfg: DistillConfig, paths: Paths, seed: int, tracker: StageRun | None = None) -> dict | None:
    student = new_student(cfg, paths, seed)
    teacher = model_dir.load(paths.base_model)
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
        student,
        teacher,
        optim_config(cfg.train),
        cfg.alpha,
        cfg.temperature,
        cfg.train.compile,
        cfg.hidden_weight,
        cfg.attention_weight,
    )
    identity = {"teacher": model_dir.weights_digest(paths.base_model), "distill": dataclasses.asdict(cfg)}
    card = {"description": "Student distilled from the pretrain model.", "teacher": paths.base_model}
    return train_and_save("distill", module, cfg.train, paths, seed, tracker, paths.student_model, card, identity)


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
