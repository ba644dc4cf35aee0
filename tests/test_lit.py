import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from lm import flops
from lm.config import TrainConfig
from lm.distill import distill_loss, head_distill_loss
from lm.flops import PEAK_BF16_FLOPS, device_peak_flops, mfu
from lm.gpt import GPT, GPTConfig
from lm.lit import adamw, lr_at
from lm.train import resolve_precision

OPT = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, weight_decay=0.1)


def test_cosine_schedule_warms_up_peaks_and_decays_to_min():
    assert lr_at(0, OPT) == pytest.approx(0.1)
    assert lr_at(9, OPT) == pytest.approx(1.0)
    assert lr_at(60, OPT) == pytest.approx(0.55)
    assert lr_at(110, OPT) == pytest.approx(0.1)
    assert lr_at(500, OPT) == pytest.approx(0.1)


def test_linear_wsd_and_constant_schedules():
    linear = dataclasses.replace(OPT, schedule="linear")
    assert [lr_at(s, linear) for s in (9, 60, 110)] == pytest.approx([1.0, 0.55, 0.1])
    wsd = dataclasses.replace(OPT, schedule="wsd", decay_fraction=0.2)  # stable to step 88, then decays over 22
    assert [lr_at(s, wsd) for s in (9, 50, 87, 99, 110)] == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1])
    constant = dataclasses.replace(OPT, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 9, 110)] == pytest.approx([0.1, 1.0, 1.0])


def test_distill_loss_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ce = F.cross_entropy(student.view(-1, 11), targets.view(-1))
    loss, kl, ce_term = distill_loss(student, teacher, targets, alpha=0.0, temperature=2.0)
    assert loss == pytest.approx(ce.item()) and ce_term == pytest.approx(ce.item())
    # KL of a distribution with itself is zero; the temperature^2 factor keeps gradients comparable
    _, kl_same, _ = distill_loss(student, student, targets, alpha=1.0, temperature=3.0)
    assert kl_same.item() == pytest.approx(0.0, abs=1e-6)
    p_t = F.softmax(teacher.view(-1, 11) / 2, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(student.view(-1, 11) / 2, -1))).sum(-1).mean() * 4
    assert kl.item() == pytest.approx(manual.item(), rel=1e-5)
    # T = 1 (its own path): the same terms
    loss_1, kl_1, ce_1 = distill_loss(student, teacher, targets, alpha=0.3, temperature=1.0)
    p_1 = F.softmax(teacher.view(-1, 11), -1)
    kl_manual = (p_1 * (p_1.log() - F.log_softmax(student.view(-1, 11), -1))).sum(-1).mean()
    assert ce_1.item() == pytest.approx(ce.item()) and kl_1.item() == pytest.approx(kl_manual.item(), rel=1e-5)
    assert loss_1.item() == pytest.approx(0.3 * kl_manual.item() + 0.7 * ce.item(), rel=1e-5)
    # from a top-k cache: all 11 logits, shuffled, give the same KL; the top 3 give the KL renormalized on them
    order = torch.randperm(11).expand(2, 5, 11)
    _, kl_all, _ = distill_loss(student, teacher.gather(-1, order), targets, 1.0, 2.0, teacher_indices=order)
    assert kl_all.item() == pytest.approx(kl.item(), rel=1e-5)
    top = teacher.topk(3, dim=-1)
    _, kl_top, _ = distill_loss(student, top.values, targets, 1.0, 2.0, teacher_indices=top.indices)
    q_t = F.softmax(top.values / 2, -1)
    s_top = F.log_softmax(student / 2, -1).gather(-1, top.indices)
    assert kl_top.item() == pytest.approx(((q_t * (q_t.log() - s_top)).sum(-1).mean() * 4).item(), rel=1e-5)


def reference_distill_loss(student, teacher, targets, alpha, temperature, teacher_indices=None):
    """The loss as autograd writes it, term by term."""
    s = F.log_softmax(student / temperature, -1)
    s = s if teacher_indices is None else s.gather(-1, teacher_indices)
    t = F.log_softmax(teacher / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    return alpha * kl + (1 - alpha) * F.cross_entropy(student.flatten(0, 1), targets.reshape(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [0, 4])
def test_distill_loss_gradient_is_autograds(temperature, top_k):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 6, 17, dtype=torch.float64), torch.randn(3, 6, 17, dtype=torch.float64)
    targets = torch.randint(0, 17, (3, 6))
    indices = None
    if top_k:
        top = teacher.topk(top_k, dim=-1)
        teacher, indices = top.values, top.indices
    ours = student.clone().requires_grad_()
    loss, kl, ce = distill_loss(ours, teacher, targets, 0.3, temperature, indices)
    (2.0 * loss).backward()
    assert not kl.requires_grad and not ce.requires_grad, "the terms are reported, not trained on"
    theirs = student.clone().requires_grad_()
    reference = reference_distill_loss(theirs, teacher, targets, 0.3, temperature, indices)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    kl_alone = reference_distill_loss(theirs, teacher, targets, 1.0, temperature, indices)
    (2.0 * reference).backward()
    assert kl.item() == pytest.approx(kl_alone.item(), rel=1e-9)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)


def test_adamw_decays_matrices_only():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16, bias=True))
    decay, no_decay = adamw(model, OPT, fused=False).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_and_mfu():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 16 * 8
    assert mfu(5e5, 1e6, 1e12, devices=1) == 0.5 and mfu(5e5, 1e6, 1e12, devices=2) == 0.25
    # the reference's figure: GPT-2 124M at 498K tokens/s on one H100 is 43% MFU
    gpt2 = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304))
    assert mfu(498_000, gpt2.flops_per_token(), PEAK_BF16_FLOPS["H100"], 1) == pytest.approx(0.43, abs=0.005)
    assert device_peak_flops() is None  # no GPU


def test_cpu_peak_is_measured_once_per_machine_then_read(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = flops.cpu_peak_flops()
    assert 1e8 < measured < 1e14, "a plausible fp32 GEMM rate"
    cache = json.loads(flops.cache_file().read_text())
    (key,) = cache
    assert flops.cpu_model() in key and f"{torch.get_num_threads()} threads" in key
    flops.cache_file().write_text(json.dumps({key: 123.0}))
    assert flops.cpu_peak_flops() == 123.0, "read from the cache, not measured again"


def test_precision_defaults_to_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_gradients_are_clipped_by_the_module_and_the_norm_before_clipping_is_logged(tmp_path):
    import lightning as L
    import numpy as np

    from lm import io
    from lm.lit import LitGPT
    from lm.tokens import save_split
    from lm.train import fit

    rng = np.random.default_rng(0)
    splits = {
        split: {"shards": save_split(tmp_path, split, [rng.integers(0, 64, n, dtype=np.uint16)])}
        for split, n in (("train", 5000), ("val", 2000))
    }
    io.write_json(tmp_path / "meta.json", {"dtype": "uint16", "vocab_size": 64, "splits": splits})
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, log_every=1, val_batches=1, grad_clip=0.05)

    class ClippedNorms(L.Callback):  # grads stay as the step left them until the next step zeroes them
        norms = []

        def on_train_batch_end(self, trainer, module, *args):
            self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]).item())

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    history = fit(LitGPT(model, cfg), cfg, tmp_path, seed=0, callbacks=[ClippedNorms()])["history"]
    assert all(r["grad_norm"] > 0.05 for r in history), "the norm before clipping"
    assert ClippedNorms.norms == pytest.approx([0.05] * 3, rel=1e-4), "what the optimizer stepped with"


@pytest.mark.parametrize("top_k", [0, 5])
def test_head_distill_loss_is_distill_loss_on_the_students_logits(top_k):
    """Chunk by chunk through the student's head (rows > a chunk's), with the teacher's logits given per chunk:
    the loss, its terms and the gradients of the student's hidden states and head are distill_loss's."""
    torch.manual_seed(0)
    rows, width, vocab = 150, 8, 8192  # chunks of 64 rows on the CPU
    hidden, head = torch.randn(rows, width, dtype=torch.float64), torch.randn(vocab, width, dtype=torch.float64)
    teacher, targets, indices = torch.randn(rows, vocab, dtype=torch.float64), torch.randint(0, vocab, (rows,)), None
    if top_k:
        teacher, indices = teacher.topk(top_k, dim=-1)
    ours = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
    loss, kl, ce = head_distill_loss(
        *ours, lambda r: (teacher[r], None if indices is None else indices[r]), targets, 0.3, 2.0
    )
    loss.backward()
    theirs = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
    expected = distill_loss(theirs[0] @ theirs[1].T, teacher, targets, 0.3, 2.0, indices)
    expected[0].backward()
    for got, want in zip((loss, kl, ce), expected, strict=True):
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got.grad, want.grad.to(got.grad.dtype), rtol=1e-5, atol=1e-8)
