"""GPTConfig: every architecture switch of lm/gpt.py, importable without torch (params parsing, orchestration)."""

import math
from dataclasses import dataclass
from typing import Literal


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

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.mix_ln_fraction <= 1.0:
            raise ValueError(f"mix_ln_fraction must be in [0, 1], got {self.mix_ln_fraction}")

    @property
    def mlp_hidden(self) -> int:
        if self.activation == "swiglu":
            return 8 * math.ceil(8 * self.n_embd / 3 / 8)
        return 4 * self.n_embd
