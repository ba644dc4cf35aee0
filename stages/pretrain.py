"""pretrain: train the base GPT on the train tokens with Lightning.

Inputs:  ${paths.tokens}
Outputs: ${paths.base_model} (model.safetensors, config.json, tokenizer.json, README.md)
Metrics: ${paths.metrics}/pretrain.json (final train and val loss, tokens/s); plots: ${paths.plots}/pretrain_loss.csv
"""

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path

import lightning as L
import numpy as np

from lm import checkpoints, export, model_dir
from lm.data import TokenDataModule, sequential_loader
from lm.gpt import GPT, GPTConfig
from lm.lit import History, LitGPT, OptimConfig, device_peak_flops, mean_loss, trainer
from stages import io
from stages.cli import stage_main
from stages.config import Paths, PretrainConfig, TrainConfig
from stages.tokenize import load_tokens
from stages.tracking import StageRun, git_commit

log = logging.getLogger("stages.pretrain")


def resolve_shape(shape: GPTConfig, tokens_dir: str | Path) -> GPTConfig:
    """Fill vocab_size from the tokenizer, rounded up to a multiple of 64 for efficient matmuls."""
    vocab = io.read_json(Path(tokens_dir) / "meta.json")["vocab_size"]
    if shape.vocab_size and shape.vocab_size < vocab:
        raise io.DataError(f"model vocab_size {shape.vocab_size} is smaller than the tokenizer's {vocab}")
    return dataclasses.replace(shape, vocab_size=shape.vocab_size or math.ceil(vocab / 64) * 64)


def optim_config(cfg: TrainConfig) -> OptimConfig:
    return OptimConfig(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        decay_fraction=cfg.decay_fraction,
    )


def fit(
    module: LitGPT,
    cfg: TrainConfig,
    tokens_dir: str | Path,
    seed: int,
    tracker: StageRun | None,
    ckpt_dir: str | Path | None = None,
    run_identity: dict | None = None,
    extra_callbacks: list[L.Callback] = (),
    teacher_topk: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict | None:
    """Train module.model on random train windows, resuming from ckpt_dir if it holds this same run;
    returns the loss history and the final val loss, or None on the other ranks of a distributed run.
    run_identity: what else besides model, training config, seed and tokens makes this run what it is.
    teacher_topk: cached teacher logits served with the windows (see stages/distill.py)."""
    block_size = module.model.config.block_size
    data = TokenDataModule(
        load_tokens(tokens_dir, "train"), block_size, cfg.batch_size, cfg.max_steps, seed, cfg.grad_accum, teacher_topk
    )
    history = History(
        cfg.log_every,
        cfg.max_steps,
        on_log=tracker.log_metrics if tracker else None,
        flops_per_token=module.model.flops_per_token(),
        peak_flops=device_peak_flops(),
    )
    callbacks, resume = [history, *extra_callbacks], None
    checkpointing = ckpt_dir is not None and cfg.checkpoint_every > 0
    if checkpointing:
        ckpt_dir = Path(ckpt_dir)
        identity = {
            "model": dataclasses.asdict(module.model.config),
            "train": dataclasses.asdict(cfg),
            "seed": seed,
            "tokens": io.read_json(Path(tokens_dir) / "meta.json"),
            "code": checkpoints.code_digest(Path(checkpoints.__file__).parent, Path(__file__).parent),
            **(run_identity or {}),
        }
        resume = checkpoints.resume_from(ckpt_dir, identity)
        callbacks.append(checkpoints.every_n_steps(ckpt_dir, cfg.checkpoint_every, cfg.keep_checkpoints))
        if resume:
            log.info("resuming from %s", resume)
    run = trainer(
        cfg.max_steps,
        cfg.precision,
        cfg.accelerator,
        cfg.devices,
        cfg.grad_clip,
        callbacks,
        cfg.strategy,
        cfg.num_nodes,
        cfg.grad_accum,
    )
    t0 = time.perf_counter()
    run.fit(module, data, ckpt_path=resume)
    train_seconds = time.perf_counter() - t0
    if checkpointing:
        run.save_checkpoint(ckpt_dir / f"step={run.global_step}.ckpt")  # every rank takes part, rank zero writes
        if run.is_global_zero:
            checkpoints.keep_last(ckpt_dir, cfg.keep_checkpoints)
    if not run.is_global_zero:
        return None
    val = sequential_loader(
        load_tokens(tokens_dir, "val"), block_size, cfg.batch_size, cfg.val_batches * cfg.batch_size * block_size
    )
    model = module.model.cpu().float()
    steps_run = run.global_step - data.start_step
    trained_tokens = steps_run * run.world_size * cfg.grad_accum * cfg.batch_size * block_size
    return {
        "final_train_loss": history.rows[-1]["train_loss"],
        "val_loss": mean_loss(model, val),
        "train_seconds": train_seconds,
        "tokens_per_s": trained_tokens / train_seconds,
        "resumed_from_step": data.start_step,
        "history": history.rows,
    }


def write_curve(rows: list[dict], path: Path) -> None:
    with io.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_trained(model: GPT, out: str | Path, paths: Paths, card: dict) -> None:
    """The model directory, plus a transformers export in its hf/ folder where the architecture maps onto one."""
    tokenizer = Path(paths.tokens) / "tokenizer.json"
    eos = io.read_json(Path(paths.tokens) / "meta.json")["eos_token"]
    with io.atomic_dir(out) as tmp:
        arch = export.export(model, tokenizer, eos, tmp / "hf")
        model_dir.save(model, tmp, tokenizer, card | {"git_commit": git_commit(), "transformers": arch or "none"})


def train_and_save(
    stage: str,
    module: LitGPT,
    cfg: TrainConfig,
    paths: Paths,
    seed: int,
    tracker: StageRun | None,
    out_dir: str,
    card: dict,
    run_identity: dict | None = None,
    teacher_topk: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict | None:
    """fit(), then the stage's loss curve and model directory; the stage's metrics, or None on other ranks."""
    ckpt_dir = Path(paths.checkpoints) / stage
    result = fit(module, cfg, paths.tokens, seed, tracker, ckpt_dir, run_identity, teacher_topk=teacher_topk)
    if result is None:
        return None  # another rank of a distributed run: rank zero writes the outputs
    write_curve(result.pop("history"), Path(paths.plots) / f"{stage}_loss.csv")
    model = module.model
    card = {"name": stage, **card, "data": paths.tokens, "parameters": model.num_params()}
    save_trained(model, out_dir, paths, card | {"val_loss": round(result["val_loss"], 4)})
    return result | {"parameters": model.num_params()}


def run(cfg: PretrainConfig, paths: Paths, seed: int, tracker: StageRun | None = None) -> dict | None:
    L.seed_everything(seed, verbose=False)
    shape = resolve_shape(cfg.model, paths.tokens)
    model = GPT(shape)
    log.info("pretrain: %.2fM parameters, %s", model.num_params() / 1e6, shape)
    module = LitGPT(model, optim_config(cfg.train), compile=cfg.train.compile)
    card = {"description": "Base GPT pretrained on the curated corpus."}
    return train_and_save("pretrain", module, cfg.train, paths, seed, tracker, paths.base_model, card)


def main() -> None:
    stage_main(
        "pretrain",
        lambda p, tracker: run(p.pretrain, p.paths, p.run.seed, tracker),
        inputs=lambda p: [p.tokens],
        artifacts=lambda p: [f"{p.plots}/pretrain_loss.csv", *model_dir.card_files(p.base_model)],
        models=lambda p: ["pretrain"],
        system_metrics=True,
    )


if __name__ == "__main__":
    main()
