"""The library's configs, importable without torch (params parsing, orchestration): GPTConfig, every architecture
switch of lm/gpt.py, and TrainConfig, every switch of the training loop (lm/train.py). They do not know where
params.yaml puts them: their errors name the field, and the parser prefixes the key."""

import math
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A bad params value; the message names the key and what is allowed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 128
    """Context length in tokens."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches while training."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers."""
    vocab_size: int = 0
    """Embedding rows; 0 means the tokenizer's vocabulary rounded up to a multiple of 64."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization layer type."""
    norm_placement: Literal["pre", "post", "normformer", "sub_ln", "mix_ln", "deepnorm"] = "pre"
    """pre: x + f(N(x)); post: N(x + f(x)); normformer: pre + norms after attention and activation + head scales;
    sub_ln (Magneto): pre + norms before each output projection, with its init; mix_ln: post in the first
    mix_ln_fraction of layers, pre after; deepnorm: N(alpha * x + f(x)), alpha = (2 n_layer)^(1/4), with its init."""
    mix_ln_fraction: float = 0.25
    """Mix-LN: fraction of the layers, from the bottom, that are Post-LN."""
    activation: Literal["gelu", "swiglu", "relu2"] = "gelu"
    """MLP activation; swiglu uses a gated hidden layer of 8/3 n_embd (rounded up to a multiple of 8)."""
    positions: Literal["learned", "rope"] = "learned"
    """Learned absolute position embeddings, or rotary embeddings on queries and keys."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    qk_norm: bool = False
    """Normalize queries and keys per head before attention."""
    center_residual: bool = False
    """Keep the residual stream's mean over its width at zero (the embeddings and each branch's output are
    centered), as Pre-RMSNorm (Jiang et al. 2023) does: a Pre-LN model (no bias) then computes exactly what the
    same weights compute with RMSNorm. Pre placement only."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.mix_ln_fraction <= 1.0:
            raise ConfigError(f"mix_ln_fraction must be in [0, 1], got {self.mix_ln_fraction}")
        if self.center_residual and (self.norm_placement != "pre" or self.bias):
            raise ConfigError(
                "center_residual needs norm_placement: pre and bias: false (a norm bias or a post norm puts the"
                f" mean back); got norm_placement: {self.norm_placement}, bias: {self.bias}"
            )

    @property
    def mlp_hidden(self) -> int:
        if self.activation == "swiglu":
            return 8 * math.ceil(8 * self.n_embd / 3 / 8)
        return 4 * self.n_embd


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """How a model is trained: one block each for pretrain, distill (and scratch) and prune's recovery, which
    share the defaults in params.yaml's `train:` section."""

    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per micro-batch and device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: a step sees batch_size x grad_accum x devices sequences."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """After warmup: cosine or linear decay to min_lr; wsd: warmup-stable-decay (stable at lr, then linear decay
    over the last decay_fraction of steps, also a constant schedule with cooldown); constant: no decay."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent decaying."""
    weight_decay: float = 0.1
    """AdamW decay on matrices; biases, norms and embeddings are not decayed."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables."""
    precision: Literal["auto", "32-true", "bf16-mixed"] = "auto"
    """auto: fp32 on CPU, bf16-mixed on GPU."""
    compile: bool = False
    """torch.compile the training forward (worth it on GPU; on CPU compiling outlasts a short run)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Lightning accelerator."""
    devices: int = 1
    """Devices (processes on CPU) per node; batch_size is per device."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Lightning strategy across devices and nodes; fsdp (GPUs only) shards parameters and optimizer state, and the
    model is saved whole."""
    num_nodes: int = 1
    """Machines; launch with torchrun or Slurm as Lightning documents."""
    log_every: int = 10
    """Steps between logged metrics."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints; 0 disables them. A killed run resumes from the newest one."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    val_batches: int = 20
    """Batches of validation (the same windows every time): at the end, and every val_every steps."""
    train_tokens: int = 0
    """Train on the first this many train tokens only (0: all): with enough steps the subset repeats, epoch after
    epoch, and the tokenizer and val split stay as they are."""
    val_every: int = 0
    """Steps between validations during training (the val curve, for steps-to-target-loss and scaling fits);
    0: only the final one."""
    final_mixture: dict[str, float] = field(default_factory=dict)
    """Domain upsampling at the end of training: domain -> weight on its share of the train tokens over the last
    final_fraction of the steps (4.0: its windows drawn four times as often; unlisted domains: 1.0); {}: one
    mixture throughout."""
    final_fraction: float = 0.2
    """final_mixture: the fraction of max_steps it applies to."""

    def __post_init__(self):
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})")
        if self.train_tokens < 0:
            raise ConfigError(f"train_tokens must be >= 0 (0: all), got {self.train_tokens}")
        if self.val_every < 0:
            raise ConfigError(f"val_every must be >= 0 (0: off), got {self.val_every}")
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ConfigError("strategy: fsdp shards the model across GPUs; with accelerator: cpu use ddp or auto")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 < self.final_fraction <= 1.0:
            raise ConfigError(f"final_fraction must be in (0, 1], got {self.final_fraction}")
        if (
            any(w < 0 for w in self.final_mixture.values())
            or self.final_mixture
            and not any(w > 0 for w in self.final_mixture.values())
        ):
            raise ConfigError(f"final_mixture: weights must be >= 0, one of them > 0; got {self.final_mixture}")
