"""Distillation: a student trained on a frozen teacher's soft targets (KL at temperature T) and the data, optionally
also on its last hidden states and attention relations (MiniLM-v2); the student started from the teacher's
blocks; the teacher's top-k logits cached on disk once for every training window."""

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lm import io, model_dir
from lm.config import TrainConfig
from lm.data import TopKLogits, final_mixture, train_tokens, training_windows
from lm.gpt import GPT, head_loss
from lm.lit import LitGPT
from lm.tokens import load_tokens, token_meta

log = logging.getLogger("lm.distill")


def distill_rows(student, teacher, targets, alpha: float, temperature: float, teacher_indices=None):
    """For student and teacher logits (rows, vocab) in fp32: the rows' summed [alpha * T^2 * KL(teacher || student)
    at temperature T + (1 - alpha) * cross-entropy on `targets` (rows, 1), the KL term, the cross-entropy] and the
    gradient of the summed loss with respect to the student's logits, written out: softmax(student) less the soft
    targets (over the vocabulary at every position, autograd's chain of log-softmax, exp, difference and product
    passes took most of a small student's step). targets None: the KL alone. teacher_indices: `teacher` holds only
    the teacher's top-k logits, at these vocabulary indices. Probabilities come from softmax, not exp of
    log-probabilities: torch's exp is several times slower where it underflows (a causal mask's entries)."""
    alpha = alpha if targets is not None else 1.0
    t = teacher / temperature if temperature != 1 else teacher
    t_log_probs, t_probs = F.log_softmax(t, dim=-1), F.softmax(t, dim=-1)
    s_log_probs = F.log_softmax(student / temperature if temperature != 1 else student, dim=-1)
    s_on_teacher = s_log_probs if teacher_indices is None else s_log_probs.gather(-1, teacher_indices)
    # the sum over rows of sum_v p_t (log p_t - log p_s), as two dot products (a pass each)
    kl = torch.vdot(t_probs.view(-1), t_log_probs.view(-1)) - torch.vdot(t_probs.view(-1), s_on_teacher.reshape(-1))
    kl = kl * temperature**2
    ce = torch.zeros_like(kl)
    if targets is not None:
        ce_log_probs = s_log_probs if temperature == 1 else F.log_softmax(student, dim=-1)
        ce = -ce_log_probs.gather(-1, targets).sum()
    kl_weight, ce_weight = alpha * temperature, 1 - alpha  # d(T^2 KL)/ds = T (p_s at T - p_t); d(CE)/ds = p_s - onehot
    if temperature == 1:
        grad = F.softmax(student, dim=-1).mul_(kl_weight + ce_weight)
    else:
        grad = F.softmax(student / temperature, dim=-1).mul_(kl_weight)
        if targets is not None:
            grad.add_(F.softmax(student, dim=-1).mul_(ce_weight))
    if teacher_indices is None:
        grad.sub_(t_probs.mul_(kl_weight))
    else:
        grad.scatter_add_(-1, teacher_indices, t_probs.mul_(-kl_weight))
    if targets is not None:
        grad.scatter_add_(-1, targets, grad.new_full(targets.shape, -ce_weight))
    return torch.stack([alpha * kl + ce_weight * ce, kl, ce]), grad


class DistillLoss(torch.autograd.Function):
    """distill_rows' loss over logits of any shape (..., vocab), averaged over rows, and its two terms (reported
    only: their gradient is not computed)."""

    @staticmethod
    def forward(ctx, student, teacher, targets, alpha, temperature, teacher_indices):
        rows = student.shape[:-1].numel()
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: the loss in fp32
        if teacher_indices is not None:
            teacher_indices = teacher_indices.reshape(rows, -1)
        if targets is not None:
            targets = targets.reshape(rows, 1)
        sums, grad = distill_rows(
            student.to(dtype).reshape(rows, -1),
            teacher.to(dtype).reshape(rows, -1),
            targets,
            alpha,
            temperature,
            teacher_indices,
        )
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        loss, kl, ce = sums / rows
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * (grad_loss / grad.shape[0])).view(ctx.shape).to(ctx.dtype), None, None, None, None, None


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    teacher_indices: torch.Tensor | None = None,
):
    """alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * cross-entropy (Hinton et al.), and
    the two terms. teacher_indices: `teacher` holds only the teacher's top-k logits, at these vocabulary indices;
    the KL is then over those k entries, the teacher renormalized on them (sparse distillation from a cache)."""
    return DistillLoss.apply(student, teacher.detach(), targets, alpha, temperature, teacher_indices)


def head_distill_loss(student_hidden, student_head, teacher_rows, targets, alpha: float, temperature: float):
    """distill_loss on the student's logits student_hidden (rows, C) @ student_head^T, computed a chunk of rows at
    a time with the student's head (gpt.head_loss). teacher_rows(rows) gives the teacher's logits for a slice of
    rows, and the vocabulary indices they are at (None: all of them)."""

    def chunk_loss(logits: torch.Tensor, rows: slice):
        teacher, indices = teacher_rows(rows)
        return distill_rows(logits, teacher.to(logits.dtype), targets[rows, None], alpha, temperature, indices)

    loss, (kl, ce) = head_loss(student_hidden, student_head, chunk_loss)
    return loss, kl, ce


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

    def relations(qkv: torch.Tensor):
        B, T, three_c = qkv.shape
        d = three_c // 3 // heads
        # the future's scores at the lowest finite value: a probability of exactly 0, and no 0 * -inf in the KL
        future = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
        mask = torch.zeros(T, T, device=qkv.device).masked_fill_(future, torch.finfo(torch.float32).min)
        for a in qkv.float().split(three_c // 3, dim=-1):
            a = a.reshape(B, T, heads, d).transpose(1, 2).reshape(B * heads, T, d)
            # scaled, masked scores in one pass (a separate division and fill took a third of the term's time)
            yield torch.baddbmm(mask, a, a.transpose(1, 2), alpha=1 / math.sqrt(d))

    pairs = zip(relations(student_qkv), relations(teacher_qkv), strict=True)
    return sum(DistillLoss.apply(s, t.detach(), None, 1.0, 1.0, None)[0] for s, t in pairs) / 3


class LitDistill(LitGPT):
    """Trains `model` (the student) on a frozen teacher's soft targets and the data; optionally also on the
    teacher's last hidden states and attention relations."""

    def __init__(
        self,
        model: GPT,
        teacher: GPT,
        cfg: TrainConfig,
        alpha: float,
        temperature: float,
        hidden_weight: float = 0.0,
        attention_weight: float = 0.0,
    ):
        super().__init__(model, cfg)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        self.strict_loading = False  # checkpoints leave out the teacher, which is rebuilt from its own files
        self.student_hidden = self.compiled(lambda x: model.ln_f(model.trunk(x)))
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

    def flops_per_token(self) -> float:
        """The student's training FLOPs and the teacher's forward (a third of its training FLOPs)."""
        return self.model.flops_per_token() + self.teacher.flops_per_token() / 3

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def training_step(self, batch, batch_idx):
        x, y, *cached = batch  # with the teacher's top-k logits and their indices, when they come cached
        if cached:
            values, indices = (c.flatten(0, 1) for c in cached)

            def teacher_rows(rows):
                return values[rows], indices[rows]
        else:
            with torch.no_grad():
                hidden = self.teacher.ln_f(self.teacher.trunk(x)).flatten(0, 1)
            head = self.teacher.lm_head.weight.float()

            def teacher_rows(rows):
                return hidden[rows].float() @ head.t(), None

        student_hidden = self.student_hidden(x).flatten(0, 1)
        loss, kl, ce = head_distill_loss(
            student_hidden, self.model.lm_head.weight, teacher_rows, y.flatten(), self.alpha, self.temperature
        )
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
    teacher: GPT,
    teacher_dir: str | Path,
    tokens_dir: str | Path,
    root: Path,
    cfg: TrainConfig,
    k: int,
    seed: int,
    block_size: int,
) -> TopKLogits:
    """The teacher's top-k logits for every window (of the student's block_size) a run of `cfg` can draw,
    memory-mapped from root/<key>; computed only when no cache has this key (teacher weights, tokens, windows, k),
    and older keys are removed then."""
    world = cfg.devices * cfg.num_nodes
    train = train_tokens(load_tokens(tokens_dir, "train"), cfg.train_tokens, block_size)
    mixture = final_mixture(cfg, tokens_dir, len(train), block_size)
    windows = training_windows(train, block_size, cfg.batch_size * cfg.grad_accum, cfg.max_steps, world, seed, *mixture)
    fingerprint = {
        "teacher": model_dir.weights_digest(teacher_dir),
        "tokens": token_meta(tokens_dir),
        "windows": [len(windows), block_size, seed, cfg.train_tokens, cfg.final_mixture, mixture[1]],
        "k": k,
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
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
            batch = cfg.batch_size
            for start in range(0, len(windows), batch):
                x = torch.stack([windows[i][0] for i in range(start, min(start + batch, len(windows)))])
                top = teacher(x).topk(k, dim=-1)
                values[start : start + len(x)] = top.values.half().numpy()
                indices[start : start + len(x)] = top.indices.numpy().astype(index_type)
                if (start // batch) % max(len(windows) // batch // 10, 1) == 0:
                    log.info("distill: teacher cache %d/%d windows", start + len(x), len(windows))
            values.flush()
            indices.flush()
    return TopKLogits(np.load(cache / "values.npy", mmap_mode="r"), np.load(cache / "indices.npy", mmap_mode="r"))
