"""Lightning modules: next-token pretraining and distillation from a teacher; the optimizer and schedule."""

import logging
import math
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lm.gpt import GPT

log = logging.getLogger("lm.lit")


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    schedule: str = "cosine"
    decay_fraction: float = 0.2


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to lr, then: cosine or linear decay to min_lr at max_steps; wsd: stable at lr, then a linear
    decay to min_lr over the last decay_fraction of the steps; constant: lr to the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    start = cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = max(cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps), cfg.warmup_steps)
        if step < start:
            return cfg.lr
    progress = min((step - start) / max(cfg.max_steps - start, 1), 1.0)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    return cfg.lr - progress * (cfg.lr - cfg.min_lr)


def adamw(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """Matrices and embeddings decay; biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    teacher_indices: torch.Tensor | None = None,
):
    """alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * cross-entropy (Hinton et al.).
    teacher_indices: `teacher` holds only the teacher's top-k logits, at these vocabulary indices; the KL is then
    over those k entries, the teacher renormalized on them (sparse distillation from a cache)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    if teacher_indices is not None:
        s = s.gather(-1, teacher_indices)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    ce = next_token_loss(student, targets)
    return alpha * kl + (1 - alpha) * ce, kl, ce


class LitGPT(L.LightningModule):
    def __init__(self, model: GPT, optim: OptimConfig, compile: bool = False):
        super().__init__()
        self.model, self.optim = model, optim
        # compiling the bound forward (not the module) keeps parameter names, checkpoints and saved weights plain
        self.forward_train = torch.compile(model.forward) if compile else model.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = next_token_loss(self.forward_train(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # before clipping: the norm that clipping acts on
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.log("grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        opt = adamw(self, self.optim, fused=self.device.type == "cuda")  # frozen modules (a teacher) are left out
        # LambdaLR multiplies the base lr: divide so lr_at's absolute value comes out
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, self.optim) / self.optim.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LastBlockTaps:
    """Keeps the last block's output and its attention's q, k, v projections from each forward."""

    def __init__(self, model: GPT):
        self.hidden = self.qkv = None
        model.h[-1].register_forward_hook(lambda m, args, out: setattr(self, "hidden", out))
        model.h[-1].attn.c_attn.register_forward_hook(lambda m, args, out: setattr(self, "qkv", out))


def attention_relation_loss(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM-v2 (Wang et al. 2021): for queries, keys and values alike, the KL between the teacher's and the
    student's causal self-relation distributions softmax(a a^T / sqrt(d)), with both split into the same number
    of relation heads, so students of any width can learn them."""

    def relations(qkv: torch.Tensor) -> list[torch.Tensor]:
        B, T, three_c = qkv.shape
        d = three_c // 3 // heads
        future = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
        out = []
        for a in qkv.float().split(three_c // 3, dim=-1):
            a = a.view(B, T, heads, d).transpose(1, 2)
            scores = (a @ a.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
            out.append(F.log_softmax(scores, dim=-1))
        return out

    loss = 0.0
    for s, t in zip(relations(student_qkv), relations(teacher_qkv), strict=True):
        loss = loss + (t.exp() * (t - s)).masked_fill(torch.isinf(t), 0.0).sum(-1).mean()
    return loss / 3


class LitDistill(LitGPT):
    """Trains `model` (the student) on a frozen teacher's soft targets and the data; optionally also on the
    teacher's last hidden states and attention relations."""

    def __init__(
        self,
        model: GPT,
        teacher: GPT,
        optim: OptimConfig,
        alpha: float,
        temperature: float,
        compile: bool = False,
        hidden_weight: float = 0.0,
        attention_weight: float = 0.0,
    ):
        super().__init__(model, optim, compile)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        self.strict_loading = False  # checkpoints leave out the teacher, which is rebuilt from its own files
        student_width, teacher_width = model.config.n_embd, teacher.config.n_embd
        # trained with the student, not part of it: maps its hidden states onto the teacher's width
        self.projection = (
            torch.nn.Linear(student_width, teacher_width, bias=False)
            if hidden_weight and student_width != teacher_width
            else None
        )
        self.relation_heads = math.gcd(model.config.n_head, teacher.config.n_head)
        if hidden_weight or attention_weight:
            self.student_taps, self.teacher_taps = LastBlockTaps(model), LastBlockTaps(teacher)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def training_step(self, batch, batch_idx):
        if len(batch) == 4:  # the teacher's top-k logits come cached with the windows
            x, y, teacher_logits, teacher_indices = batch
        else:
            x, y = batch
            with torch.no_grad():
                teacher_logits, teacher_indices = self.teacher(x), None
        student_logits = self.forward_train(x)
        loss, kl, ce = distill_loss(student_logits, teacher_logits, y, self.alpha, self.temperature, teacher_indices)
        logs = {"train_kl": kl, "train_ce": ce}
        if self.hidden_weight:
            hidden = self.student_taps.hidden.float()
            hidden = self.projection(hidden) if self.projection is not None else hidden
            logs["train_hidden"] = F.mse_loss(hidden, self.teacher_taps.hidden.float())
            loss = loss + self.hidden_weight * logs["train_hidden"]
        if self.attention_weight:
            logs["train_relations"] = attention_relation_loss(
                self.student_taps.qkv, self.teacher_taps.qkv, self.relation_heads
            )
            loss = loss + self.attention_weight * logs["train_relations"]
        self.log_dict({"train_loss": loss, **logs}, prog_bar=True, sync_dist=True)
        return loss

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # dropout stays off in the teacher
        return self


# dense bf16 peak FLOP/s of one device, by a name fragment of torch.cuda.get_device_name(), for MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak_flops() -> float | None:
    """The current GPU's dense bf16 peak, or None (CPU, or a GPU not in the table: MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak_flops * devices)


class History(L.Callback):
    """Every `every` steps: record the logged metrics, lr, tokens/s, MFU and peak memory, log a progress line,
    call on_log. MFU = tokens/s x training FLOPs per token (GPT.flops_per_token) / (devices x peak FLOP/s)."""

    def __init__(
        self,
        every: int,
        total_steps: int,
        on_log: Callable[[dict, int], None] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ):
        self.every, self.total_steps, self.on_log = every, total_steps, on_log
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.rows: list[dict] = []

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]

    def on_train_start(self, trainer, pl_module):
        self._t0, self._tokens = time.perf_counter(), 0
        self._logged_step = self.rows[-1]["step"] if self.rows else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch[0].numel() * trainer.world_size
        step = trainer.global_step
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


def trainer(
    max_steps: int,
    precision: str,
    accelerator: str,
    devices: int,
    grad_clip: float,
    callbacks: list[L.Callback],
    strategy: str = "auto",
    num_nodes: int = 1,
    grad_accum: int = 1,
) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        precision=resolve_precision(precision, accelerator),
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        use_distributed_sampler=False,  # TokenDataModule shards each step's windows across ranks itself
        gradient_clip_val=grad_clip or None,
        accumulate_grad_batches=grad_accum,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


@torch.no_grad()
def window_losses(model: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each window in the loader, on the CPU: two models scored on the
    same windows can be compared window by window."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        token_losses = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none")
        losses.append(token_losses.double().mean(dim=1).cpu())
    return torch.cat(losses)


def mean_loss(model: torch.nn.Module, loader: DataLoader) -> float:
    """Mean next-token cross-entropy (nats) over every target in the loader (its windows are all one length)."""
    return window_losses(model, loader).mean().item()
