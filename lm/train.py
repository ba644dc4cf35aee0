"""The training loop: a Lightning Trainer over random token windows, with resumable checkpoints, a logged
history (loss, lr, tokens/s, MFU, peak memory), the final val loss, and the trained model's directory."""

import csv
import dataclasses
import logging
import math
import os
import pickle
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from lm import checkpoints, export, io, model_dir, tables
from lm.config import ConfigError, GPTConfig, TrainConfig
from lm.data import TokenDataModule, TopKLogits, final_mixture, train_tokens
from lm.flops import mfu, peak_flops
from lm.gpt import GPT
from lm.lit import LitGPT
from lm.scoring import domain_losses, sequential_loader, window_domains, window_losses
from lm.tokens import TOKENIZER, load_tokens, token_meta

log = logging.getLogger("lm.train")


def resolve_shape(shape: GPTConfig, tokens_dir: str | Path) -> GPTConfig:
    """Fill vocab_size from the tokenizer, rounded up to a multiple of 64 for efficient matmuls."""
    vocab = token_meta(tokens_dir)["vocab_size"]
    if shape.vocab_size and shape.vocab_size < vocab:
        raise io.DataError(f"model vocab_size {shape.vocab_size} is smaller than the tokenizer's {vocab}")
    return dataclasses.replace(shape, vocab_size=shape.vocab_size or math.ceil(vocab / 64) * 64)


def new_model(shape: GPTConfig, tokens_dir: str | Path, seed: int) -> GPT:
    """A freshly initialized model of this shape, its vocabulary the tokenizer's: the same seed and shape give the
    same weights (the distilled student and its from-scratch control start alike)."""
    L.seed_everything(seed, verbose=False)
    return GPT(resolve_shape(shape, tokens_dir))


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class History(L.Callback):
    """Every `every` steps: record the logged metrics, lr, tokens/s, MFU and peak memory, log a progress line,
    call on_log. MFU = tokens/s x training FLOPs per token (GPT.flops_per_token) / (devices x peak FLOP/s).
    Every `val_every` steps (0: never; the final validation is fit's): the val loss, val_loss(model), into
    val_rows and on_log."""

    def __init__(
        self,
        every: int,
        total_steps: int,
        on_log: Callable[[dict, int], None] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        val_every: int = 0,
        val_loss: Callable[[torch.nn.Module], float] | None = None,
    ):
        self.every, self.total_steps, self.on_log = every, total_steps, on_log
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.val_every, self.val_loss = val_every, val_loss
        self.rows: list[dict] = []
        self.val_rows: list[dict] = []

    def state_dict(self) -> dict:
        return {"rows": self.rows, "val_rows": self.val_rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.val_rows = state["rows"], state.get("val_rows", [])

    def validate(self, trainer, model: torch.nn.Module) -> None:
        """Every rank scores (a sharded model's forward is collective); the model goes back to training."""
        step = trainer.global_step
        if self.val_rows and self.val_rows[-1]["step"] == step:
            return
        loss = self.val_loss(model)
        model.train()
        self.val_rows.append({"step": step, "val_loss": loss})
        if trainer.is_global_zero and self.on_log:
            self.on_log({"val_loss": loss}, step)

    def on_train_start(self, trainer, pl_module):
        self._t0, self._tokens = time.perf_counter(), 0
        self._logged_step = self.rows[-1]["step"] if self.rows else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch[0].numel() * trainer.world_size
        step = trainer.global_step
        if self.val_every and step % self.val_every == 0 and 0 < step < self.total_steps:
            self.validate(trainer, pl_module.model)
        # with gradient accumulation several micro-batches end at the same optimizer step: log it once
        if step == self._logged_step or (step % self.every and step != self.total_steps):
            return
        self._logged_step = step
        elapsed = time.perf_counter() - self._t0
        row = {"step": step, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        row |= {"lr": trainer.optimizers[0].param_groups[0]["lr"], "tokens_per_s": self._tokens / elapsed}
        if self.flops_per_token and self.peak_flops:
            row["mfu"] = mfu(row["tokens_per_s"], self.flops_per_token, self.peak_flops, trainer.world_size)
        row["peak_mem_mb"] = peak_memory_mb()
        self.rows.append(row)
        if not trainer.is_global_zero:
            return
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
            step,
            self.total_steps,
            row.get("train_loss", math.nan),
            row["lr"],
            row["tokens_per_s"],
        )
        if self.on_log:
            self.on_log(row, step)


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto: bf16-mixed where a GPU trains, fp32 elsewhere (bf16 autocast on CPU is far slower)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


# LitDistill keeps its frozen teacher in eval mode on purpose; TokenDataModule resumes its position itself
# (its state is in the checkpoint); a checkpoint folder holds run.json; the logger tip advertises a hosted service
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "Tip:" not in record.getMessage())


def launched_together(accelerator: str) -> tuple[int, Callable[[], None] | None]:
    """(global rank, barrier) where a launcher started every rank at once (torchrun, or srun under Slurm): the
    process group is made here, as Lightning would make it (Lightning then uses it), so that the ranks can agree
    on a checkpoint before fitting. (0, None) for one process, or where Lightning starts the other processes itself
    (after this one has chosen its checkpoint)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for kind in (TorchElasticEnvironment, SLURMEnvironment):
        if not kind.detect() or (env := kind()).world_size() < 2:
            continue
        if not torch.distributed.is_initialized():
            nccl = accelerator != "cpu" and torch.cuda.is_available()
            if nccl:
                torch.cuda.set_device(env.local_rank())
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
            torch.distributed.init_process_group(
                "nccl" if nccl else "gloo", rank=env.global_rank(), world_size=env.world_size()
            )
        return env.global_rank(), torch.distributed.barrier
    return 0, None


def trainer(cfg: TrainConfig, callbacks: list[L.Callback]) -> L.Trainer:
    if cfg.strategy == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("strategy: fsdp shards the model across GPUs, and this machine has none: use ddp or auto")
    return L.Trainer(
        max_steps=cfg.max_steps,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        use_distributed_sampler=False,  # TokenDataModule shards each step's windows across ranks itself
        accumulate_grad_batches=cfg.grad_accum,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def gather_whole_model(run: L.Trainer, module: LitGPT) -> None:
    """After an FSDP fit, module.model holds this rank's shards only: every rank takes part in gathering the full
    state dict, and rank zero's module gets a whole model of it (what the model directory saves)."""
    if not isinstance(run.strategy, FSDPStrategy):
        return
    full = run.strategy.lightning_module_state_dict()  # state_dict_type "full": rank zero receives, on CPU
    if run.is_global_zero:
        model = GPT(module.model.config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")})
        module.model = model


def fit(
    module: LitGPT,
    cfg: TrainConfig,
    tokens_dir: str | Path,
    seed: int,
    on_log: Callable[[dict, int], None] | None = None,
    ckpt_dir: str | Path | None = None,
    fingerprint: dict | None = None,
    callbacks: list[L.Callback] = (),
    teacher_logits: TopKLogits | None = None,
) -> dict | None:
    """Train module.model on random train windows, resuming from ckpt_dir if it holds this same run; returns the
    loss history and the final val loss, or None on the other ranks of a distributed run.
    on_log(row, step): called with each logged row (the tracker's log_metrics).
    fingerprint: what else besides model, training config, seed, tokens and this library's code makes the run
    what it is (a checkpoint of another run is never resumed).
    teacher_logits: a teacher's cached top-k logits, served with the windows (lm/distill.py)."""
    block_size = module.model.config.block_size
    train = train_tokens(load_tokens(tokens_dir, "train"), cfg.train_tokens, block_size)
    mixture = final_mixture(cfg, tokens_dir, len(train), block_size)
    data = TokenDataModule(
        train, block_size, cfg.batch_size, cfg.max_steps, seed, cfg.grad_accum, teacher_logits, mixture
    )
    val = sequential_loader(
        load_tokens(tokens_dir, "val"), block_size, cfg.batch_size, cfg.val_batches * cfg.batch_size * block_size
    )
    history = History(
        cfg.log_every,
        cfg.max_steps,
        on_log=on_log,
        flops_per_token=module.flops_per_token(),
        peak_flops=peak_flops(cfg.accelerator),
        val_every=cfg.val_every,
        val_loss=lambda model: window_losses(model, val).mean().item(),
    )
    callbacks, resume = [history, *callbacks], None
    checkpointing = ckpt_dir is not None and cfg.checkpoint_every > 0
    if checkpointing:
        run_fingerprint = {
            "model": dataclasses.asdict(module.model.config),
            "train": dataclasses.asdict(cfg),
            "seed": seed,
            "tokens": token_meta(tokens_dir),
            "code": checkpoints.code_digest(Path(__file__).parent),
            **(fingerprint or {}),
        }
        rank, barrier = launched_together(cfg.accelerator)
        resume = checkpoints.resume_from(ckpt_dir, run_fingerprint, rank, barrier)
        callbacks.append(checkpoints.every_n_steps(ckpt_dir, cfg.checkpoint_every, cfg.keep_checkpoints))
        if resume:
            log.info("resuming from %s", resume)
    run = trainer(cfg, callbacks)
    t0 = time.perf_counter()
    try:  # weights_only: a checkpoint is tensors and plain values; a pickle that would run code is refused
        run.fit(module, data, ckpt_path=resume, weights_only=True)
    except pickle.UnpicklingError as e:
        raise io.DataError(f"{resume}: refused, not a plain checkpoint (torch.load, weights_only): {e}") from None
    train_seconds = time.perf_counter() - t0
    if checkpointing:
        # every rank takes part, rank zero writes
        run.save_checkpoint(checkpoints.join(ckpt_dir, f"step={run.global_step}.ckpt"), weights_only=False)
        if run.is_global_zero:
            checkpoints.keep_last(ckpt_dir, cfg.keep_checkpoints)
    gather_whole_model(run, module)
    if not run.is_global_zero:
        return None
    model = module.model.cpu().float()
    steps_run = run.global_step - data.start_step
    tokens_per_step = run.world_size * cfg.grad_accum * cfg.batch_size * block_size
    trained_tokens = steps_run * tokens_per_step
    tokens_per_s = trained_tokens / train_seconds
    utilization = {}
    if history.peak_flops:  # None on a GPU missing from PEAK_BF16_FLOPS
        utilization["mfu"] = mfu(tokens_per_s, history.flops_per_token, history.peak_flops, run.world_size)
    val_windows = window_losses(model, val).numpy()
    val_domains = window_domains(tokens_dir, block_size, len(val_windows))
    val_curve = [*history.val_rows, {"step": run.global_step, "val_loss": val_windows.mean().item()}]
    return {
        "final_train_loss": history.rows[-1]["train_loss"],
        "val_loss": val_windows.mean().item(),
        **domain_losses(val_windows, val_domains),
        "val_windows": val_windows,
        "val_domains": val_domains,
        "train_seconds": train_seconds,
        "tokens": trained_tokens,
        "train_flops": trained_tokens * history.flops_per_token,
        "tokens_per_s": tokens_per_s,
        **utilization,
        "resumed_from_step": data.start_step,
        "history": history.rows,
        "val_curve": [row | {"tokens": row["step"] * tokens_per_step} for row in val_curve],
    }


def write_curve(rows: list[dict], path: str | Path) -> None:
    with io.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_trained(model: GPT, out_dir: str | Path, tokens_dir: str | Path, card: dict) -> None:
    """The model directory, plus a transformers export in its hf/ folder where the architecture maps onto one."""
    tokenizer = Path(tokens_dir) / TOKENIZER
    with io.atomic_dir(out_dir) as tmp:
        arch = export.export(model, tokenizer, token_meta(tokens_dir)["eos_token"], tmp / "hf")
        model_dir.save(model, tmp, tokenizer, card | {"transformers": arch or "none"})


def train_and_save(
    module: LitGPT,
    cfg: TrainConfig,
    tokens_dir: str | Path,
    seed: int,
    out_dir: str | Path,
    curve: str | Path,
    val_curve: str | Path,
    windows: str | Path,
    card: dict,
    **fit_options,
) -> dict | None:
    """fit(module, cfg, tokens_dir, seed, **fit_options), then the loss curve and the val curve (CSVs; the val
    curve's last row is the final validation), the val loss of each val window (WINDOW_LOSSES, under the model
    name card["name"]) and the model directory with its card; the run's metrics, or None on the other ranks of a
    distributed run."""
    result = fit(module, cfg, tokens_dir, seed, **fit_options)
    if result is None:
        return None  # another rank of a distributed run: rank zero writes the outputs
    write_curve(result.pop("history"), curve)
    write_curve(result.pop("val_curve"), val_curve)
    name = card["name"]
    tables.write_window_losses({name: result.pop("val_windows")}, {name: result.pop("val_domains")}, windows)
    model = module.model
    card = card | {"data": str(tokens_dir), "parameters": model.num_params(), "val_loss": round(result["val_loss"], 4)}
    save_trained(model, out_dir, tokens_dir, card)
    return result | {"parameters": model.num_params()}


def continued_from(model: GPT, init_from: str | Path) -> GPT:
    """`model` with the weights of the model directory init_from, whose shape must be model's."""
    source = model_dir.load(init_from)
    differ = {
        key: (value, getattr(model.config, key))
        for key, value in dataclasses.asdict(source.config).items()
        if value != getattr(model.config, key)
    }
    if differ:
        shown = ", ".join(f"{key} {ours!r} (configured: {theirs!r})" for key, (ours, theirs) in differ.items())
        raise ConfigError(f"init_from {init_from}: its model differs from the configured shape: {shown}")
    model.load_state_dict(source.state_dict())
    return model


def train_new(
    shape: GPTConfig, cfg: TrainConfig, tokens_dir: str | Path, seed: int, init_from: str | Path = "", **outputs
) -> dict | None:
    """A new model of `shape` (new_model), or one continued from the model directory init_from, trained by
    next-token prediction: train_and_save(..., **outputs)."""
    model = new_model(shape, tokens_dir, seed)
    if init_from:
        model = continued_from(model, init_from)
        outputs["fingerprint"] = {"init_from": model_dir.weights_digest(init_from)}  # never resume another start
    log.info("%.2fM parameters, %s", model.num_params() / 1e6, model.config)
    return train_and_save(LitGPT(model, cfg), cfg, tokens_dir, seed, **outputs)
