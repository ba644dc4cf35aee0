"""distill: train a smaller student on the teacher's soft targets (KL at temperature T) and the data, optionally
also on its last hidden states and attention relations (MiniLM-v2).

Inputs:  ${paths.base_model} (the teacher), ${paths.tokens}
Outputs: ${paths.student_model}
Metrics: ${paths.metrics}/distill.json; plots: ${paths.plots}/distill_loss.csv
"""

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lm import model_dir
from lm.data import training_windows
from lm.gpt import GPT
from lm.lit import LitDistill
from stages import io
from stages.cli import stage_main
from stages.config import DistillConfig, Paths
from stages.pretrain import optim_config, resolve_shape, train_and_save
from stages.tokenize import load_tokens
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


@torch.no_grad()
def teacher_topk_cache(
    teacher: GPT, cfg: DistillConfig, paths: Paths, seed: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k logits for every window the run can draw, as memory-mapped (values fp16, indices)
    arrays in checkpoints/distill/teacher-topk/<key>; computed only when no cache has this key (teacher weights,
    tokens, windows, k), and older keys are removed then."""
    train_cfg, k = cfg.train, cfg.teacher_topk
    world = train_cfg.devices * train_cfg.num_nodes
    per_step = train_cfg.batch_size * train_cfg.grad_accum
    train = load_tokens(paths.tokens, "train")
    windows = training_windows(train, block_size, per_step, train_cfg.max_steps, world, seed)
    identity = {
        "teacher": model_dir.weights_digest(paths.base_model),
        "tokens": io.read_json(Path(paths.tokens) / "meta.json"),
        "windows": [len(windows), block_size, seed],
        "k": k,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(paths.checkpoints) / "distill" / "teacher-topk"
    cache = root / key
    if not cache.exists():
        for old in root.glob("*") if root.exists() else []:
            shutil.rmtree(old)
        log.info("distill: caching the teacher's top-%d logits for %d windows in %s", k, len(windows), cache)
        index_type = np.uint16 if teacher.config.vocab_size <= 2**16 else np.int32
        with io.atomic_dir(cache) as tmp:
            shape = (len(windows), block_size, k)
            values = np.lib.format.open_memmap(tmp / "values.npy", "w+", np.float16, shape)
            indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", index_type, shape)
            batch = train_cfg.batch_size
            for start in range(0, len(windows), batch):
                x = torch.stack([windows[i][0] for i in range(start, min(start + batch, len(windows)))])
                top = teacher(x).topk(k, dim=-1)
                values[start : start + len(x)] = top.values.half().numpy()
                indices[start : start + len(x)] = top.indices.numpy().astype(index_type)
                if (start // batch) % max(len(windows) // batch // 10, 1) == 0:
                    log.info("distill: teacher cache %d/%d windows", start + len(x), len(windows))
            values.flush()
            indices.flush()
    return np.load(cache / "values.npy", mmap_mode="r"), np.load(cache / "indices.npy", mmap_mode="r")


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
    cached = teacher_topk_cache(teacher, cfg, paths, seed, shape.block_size) if cfg.teacher_topk else None
    identity = {"teacher": model_dir.weights_digest(paths.base_model), "distill": dataclasses.asdict(cfg)}
    card = {"description": "Student distilled from the pretrain model.", "teacher": paths.base_model}
    return train_and_save(
        "distill", module, cfg.train, paths, seed, tracker, paths.student_model, card, identity, cached
    )


def main() -> None:
    stage_main(
        "distill",
        lambda p, tracker: run(p.distill, p.paths, p.run.seed, tracker),
        inputs=lambda p: [p.base_model, p.tokens],
        artifacts=lambda p: [f"{p.plots}/distill_loss.csv", *model_dir.card_files(p.student_model)],
        models=lambda p: ["distill"],
        system_metrics=True,
    )


if __name__ == "__main__":
    main()
