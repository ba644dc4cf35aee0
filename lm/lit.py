"""The Lightning module of next-token training, its optimizer and schedule, and the loss by window."""

import math

import lightning as L
import torch

from lm.config import TrainConfig
from lm.gpt import GPT


def lr_at(step: int, cfg: TrainConfig) -> float:
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


def adamw(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """Matrices and embeddings decay; biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


class LitGPT(L.LightningModule):
    """Next-token training of `model` with AdamW and cfg's learning-rate schedule."""

    def __init__(self, model: GPT, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        # compiled with its loss, so the full-vocabulary fp32 logits need not be written out; compiling a function
        # (not the module) keeps parameter names, checkpoints and saved weights plain
        self.train_loss = self.compiled(model.loss)

    def compiled(self, fn):
        return torch.compile(fn) if self.cfg.compile else fn

    def flops_per_token(self) -> float:
        """Training FLOPs per token of everything a step runs (GPT.flops_per_token)."""
        return self.model.flops_per_token()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.train_loss(x, y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        """Clip the gradients' total norm to cfg.grad_clip here, not through the Trainer, which refuses to clip
        for a fused optimizer under mixed precision (bf16 needs no unscaling); log the norm before clipping."""
        trained = [p for p in self.parameters() if p.grad is not None]
        if not self.cfg.grad_clip:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trained])
        elif sharded := getattr(self.trainer.model, "clip_grad_norm_", None):  # FSDP: the norm over every shard
            norm = sharded(self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(trained, self.cfg.grad_clip)
        self.log("grad_norm", norm)

    def configure_optimizers(self):
        opt = adamw(self, self.cfg, fused=self.device.type == "cuda")  # frozen modules (a teacher) are left out
        # LambdaLR multiplies the base lr: divide so lr_at's absolute value comes out
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, self.cfg) / self.cfg.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
