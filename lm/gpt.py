"""A GPT-style decoder in one file (after nanoGPT). Imports only torch.

Every architecture switch of GPTConfig is visible here: normalization type (LayerNorm, RMSNorm) and placement
(Pre-LN, Post-LN, NormFormer, Sub-LN/Magneto, Mix-LN, DeepNorm), MLP activation (GELU, SwiGLU, ReLU²),
positions (learned, RoPE), QK-norm, tied or untied embeddings. Attention runs through scaled_dot_product_attention.
The default (Pre-LN, LayerNorm, GELU, learned positions, tied) is GPT-2.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.config import GPTConfig  # noqa: F401 - the model's config, re-exported: `from lm.gpt import GPTConfig`


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    return nn.LayerNorm(dim, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(dim, eps=1e-5)


def centered(x: torch.Tensor) -> torch.Tensor:
    """x less its mean over the width: what center_residual adds to the residual stream."""
    return x - x.mean(dim=-1, keepdim=True)


def block_placement(cfg: GPTConfig, layer: int) -> str:
    """The placement of one layer: Mix-LN resolves to post for the first layers and pre for the rest."""
    if cfg.norm_placement == "mix_ln":
        return "post" if layer < int(cfg.mix_ln_fraction * cfg.n_layer) else "pre"
    return cfg.norm_placement


def rope_tables(block_size: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_size) in the half-split layout (as in HF Llama)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hs/2}) pair of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        head_size = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, head_size) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, head_size) if cfg.qk_norm else None
        self.head_scale = nn.Parameter(torch.ones(cfg.n_head)) if cfg.norm_placement == "normformer" else None
        self.sub_norm = make_norm(cfg) if cfg.norm_placement == "sub_ln" else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        if self.head_scale is not None:
            y = y * self.head_scale.view(1, -1, 1, 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.activation = cfg.activation
        gates = 2 if cfg.activation == "swiglu" else 1
        self.c_fc = nn.Linear(cfg.n_embd, gates * cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.act_norm = make_norm(cfg, cfg.mlp_hidden) if cfg.norm_placement in ("normformer", "sub_ln") else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, gates * hidden)
        if self.activation == "swiglu":
            a, gate = h.chunk(2, dim=-1)
            h = F.silu(a) * gate
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        if self.act_norm is not None:
            h = self.act_norm(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.placement = block_placement(cfg, layer)
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.post_attn_norm = make_norm(cfg) if self.placement == "normformer" else None
        self.residual_scale = (2 * cfg.n_layer) ** 0.25 if self.placement == "deepnorm" else 1.0
        self.center = centered if cfg.center_residual else nn.Identity()

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.placement in ("post", "deepnorm"):
            x = self.ln_1(self.residual_scale * x + self.attn(x, rope))
            return self.ln_2(self.residual_scale * x + self.mlp(x))
        a = self.attn(self.ln_1(x), rope)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + self.center(a)
        return x + self.center(self.mlp(self.ln_2(x)))


def logit_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits head_loss computes at once: on the CPU, 2 MB of fp32 (within a core's L2 cache); elsewhere
    1 GB, so a GPU's kernels stay large."""
    return max(1, (1 << 19 if device.type == "cpu" else 1 << 28) // vocab_size)


class HeadLoss(torch.autograd.Function):
    """A loss on the logits hidden @ weight^T, a chunk of rows at a time, with its gradient computed in the forward,
    so the (rows, vocab) logits and their gradient are never whole in memory (a 32 x 128 batch's are 0.8 GB per
    copy at a 50K vocabulary). The same three matmuls as autograd's, in fp32 or wider. chunk_loss(logits, rows)
    gets a chunk's logits (free to overwrite) and its slice of rows; it returns their summed loss terms (the loss
    first; the rest, such as a mix's parts, are reported only) and the gradient of the summed loss with respect
    to the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, chunk_loss):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 activations: the loss in fp32
        h, w = hidden.to(dtype), weight.to(dtype)
        rows, chunk = h.shape[0], logit_chunk_rows(w.shape[0], h.device)
        grad_h, grad_w, totals = torch.empty_like(h), torch.zeros_like(w), 0
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                terms, grad = chunk_loss(h[part] @ w.t(), part)
                totals = totals + terms.double()
                torch.mm(grad, w, out=grad_h[part])
                grad_w.addmm_(grad.t(), h[part])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        loss, terms = (totals[0] / rows).to(dtype), (totals[1:] / rows).to(dtype)
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, grad_terms):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / grad_h.shape[0]
        return (grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, chunk_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over rows of chunk_loss on hidden (rows, C) @ weight (vocab, C)^T, and of its reported terms,
    without the (rows, vocab) logits in memory at once (HeadLoss)."""
    return HeadLoss.apply(hidden, weight, chunk_loss)


def cross_entropy_rows(targets: torch.Tensor):
    """chunk_loss for head_loss: cross-entropy against targets (rows,)."""

    def chunk_loss(logits: torch.Tensor, rows: slice):
        chosen = targets[rows, None]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        loss = lse.sum() - logits.gather(-1, chosen).sum()
        grad = logits.sub_(lse).exp_()  # softmax
        grad.scatter_add_(-1, chosen, grad.new_full(chosen.shape, -1.0))  # less the one-hot
        return loss[None], grad

    return chunk_loss


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("GPTConfig.vocab_size must be set (resolve it from the tokenizer first)")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        # a stack whose every layer ends in a norm (post, deepnorm) needs no final one
        all_post = all(b.placement in ("post", "deepnorm") for b in self.h)
        self.ln_f = nn.Identity() if all_post else make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        self._init_residual_branches()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def _init_residual_branches(self) -> None:
        """Scale the weights that feed the residual stream, as each placement's paper prescribes."""
        n_layer, placement = self.config.n_layer, self.config.norm_placement
        if placement in ("deepnorm", "sub_ln"):
            # DeepNet: beta = (8N)^(-1/4); Magneto: gamma = sqrt(log 2N); on v, attention out, and both MLP matrices
            gain = (8 * n_layer) ** -0.25 if placement == "deepnorm" else math.sqrt(math.log(2 * n_layer))
            for block in self.h:
                C = self.config.n_embd
                block.attn.c_attn.weight[2 * C :].mul_(gain)
                for linear in (block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                    linear.weight.mul_(gain)
            return
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (a tied head is the embedding); learned positions excluded if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * L * d * T (PaLM,
        appendix B); the same count bench/ref_gpt.py uses."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); last_only: the last position's alone (B, 1, vocab_size),
        all that decoding needs of the head, its largest matmul."""
        x = self.trunk(idx)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of idx's predictions (B, T) against targets (B, T): the head runs with
        the loss, a chunk of positions at a time (head_loss); compiled, inductor fuses them itself."""
        x = self.ln_f(self.trunk(idx)).flatten(0, 1)
        if torch.compiler.is_compiling():
            return F.cross_entropy(self.lm_head(x).float(), targets.flatten())
        return head_loss(x, self.lm_head.weight, cross_entropy_rows(targets.flatten()))[0]

    @torch.no_grad()
    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy (B, T) of each of idx's predictions against targets, in fp32; the head runs a
        chunk of positions at a time (logit_chunk_rows)."""
        x = self.ln_f(self.trunk(idx)).flatten(0, 1)
        weight = self.lm_head.weight  # read once: a packed head dequantizes on every read
        losses, chosen = torch.empty(x.shape[0], device=x.device), targets.flatten()
        step = logit_chunk_rows(weight.shape[0], x.device)
        for start in range(0, x.shape[0], step):
            part = slice(start, start + step)
            logits = F.linear(x[part], weight).float()
            losses[part] = torch.logsumexp(logits, dim=-1) - logits.gather(-1, chosen[part, None]).squeeze(-1)
        return losses.view_as(targets)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the last block's outputs (B, T, n_embd), before the final norm and the head."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.config.positions == "rope" else None
        x = self.drop(x)
        if self.config.center_residual:
            x = centered(x)
        for block in self.h:
            x = block(x, rope)
        return x

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :], last_only=True)[:, -1, :]  # (B, vocab_size)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
