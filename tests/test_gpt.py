import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.gpt import GPT, GPTConfig, block_placement

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
VARIANTS = {
    "pre-layernorm-gelu": {},
    "pre-rmsnorm": {"norm": "rmsnorm"},
    "post": {"norm_placement": "post", "bias": True},
    "normformer": {"norm_placement": "normformer"},
    "sub_ln": {"norm_placement": "sub_ln", "norm": "rmsnorm"},
    "mix_ln": {"norm_placement": "mix_ln", "mix_ln_fraction": 0.5, "n_layer": 4},
    "deepnorm": {"norm_placement": "deepnorm"},
    "swiglu": {"activation": "swiglu"},
    "relu2": {"activation": "relu2"},
    "rope": {"positions": "rope"},
    "qk_norm-rope-rmsnorm": {"qk_norm": True, "positions": "rope", "norm": "rmsnorm"},
    "untied": {"tie_embeddings": False},
    "center_residual": {"center_residual": True},
    "llama-like": {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "tie_embeddings": False},
}


# ---- a written-out reference of the forward pass, from the module's own weights ----


def ref_norm(x, norm):
    if isinstance(norm, nn.LayerNorm):
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + norm.eps)
        return y * norm.weight + (norm.bias if norm.bias is not None else 0)
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_linear(x, linear):
    return x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)


def ref_rotate(x, base):
    """Rotate the pairs (x_i, x_{i+hs/2}) at position t by t * base^(-2i/hs), one pair at a time."""
    T, hs = x.shape[-2], x.shape[-1]
    out = x.clone()
    for t in range(T):
        for i in range(hs // 2):
            angle = t * base ** (-2 * i / hs)
            a, b = x[..., t, i], x[..., t, i + hs // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + hs // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def ref_attention(attn, x, cfg):
    B, T, C = x.shape
    hs = C // cfg.n_head
    q, k, v = ref_linear(x, attn.c_attn).split(C, dim=2)
    q, k, v = (t.reshape(B, T, cfg.n_head, hs).transpose(1, 2) for t in (q, k, v))
    if cfg.qk_norm:
        q, k = ref_norm(q, attn.q_norm), ref_norm(k, attn.k_norm)
    if cfg.positions == "rope":
        q, k = ref_rotate(q, cfg.rope_base), ref_rotate(k, cfg.rope_base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    if attn.head_scale is not None:
        y = y * attn.head_scale[None, :, None, None]
    y = y.transpose(1, 2).reshape(B, T, C)
    if attn.sub_norm is not None:
        y = ref_norm(y, attn.sub_norm)
    return ref_linear(y, attn.c_proj)


def ref_mlp(mlp, x, cfg):
    h = ref_linear(x, mlp.c_fc)
    if cfg.activation == "swiglu":
        a, g = h.chunk(2, dim=-1)
        h = a * torch.sigmoid(a) * g
    elif cfg.activation == "relu2":
        h = torch.clamp(h, min=0) ** 2
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if mlp.act_norm is not None:
        h = ref_norm(h, mlp.act_norm)
    return ref_linear(h, mlp.c_proj)


def ref_forward(model, idx):
    cfg = model.config
    x = model.wte.weight[idx]
    if cfg.positions == "learned":
        x = x + model.wpe.weight[: idx.shape[1]]
    center = (lambda t: t - t.mean(-1, keepdim=True)) if cfg.center_residual else (lambda t: t)
    x = center(x)
    for layer, block in enumerate(model.h):
        placement = block_placement(cfg, layer)
        if placement in ("post", "deepnorm"):
            alpha = (2 * cfg.n_layer) ** 0.25 if placement == "deepnorm" else 1.0
            x = ref_norm(alpha * x + ref_attention(block.attn, x, cfg), block.ln_1)
            x = ref_norm(alpha * x + ref_mlp(block.mlp, x, cfg), block.ln_2)
        else:
            a = ref_attention(block.attn, ref_norm(x, block.ln_1), cfg)
            if placement == "normformer":
                a = ref_norm(a, block.post_attn_norm)
            x = x + center(a)
            x = x + center(ref_mlp(block.mlp, ref_norm(x, block.ln_2), cfg))
    if any(block_placement(cfg, i) in ("pre", "normformer", "sub_ln") for i in range(cfg.n_layer)):
        x = ref_norm(x, model.ln_f)
    return x @ model.lm_head.weight.T


def perturbed(model):
    """Move every norm gain, bias and head scale off its init so the reference checks that each one is used."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_written_out_reference(variant):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    model = perturbed(GPT(cfg)).eval()
    idx = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(idx), ref_forward(model, idx), atol=2e-5, rtol=1e-4)


def train_curve(model: GPT, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The loss of each of `steps` AdamW steps on the one batch x."""
    opt = torch.optim.AdamW(model.train().parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(variant):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, **VARIANTS[variant]))
    losses = train_curve(model, torch.randint(0, 64, (4, 9)), steps=50)
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_centered_pre_ln_is_pre_rmsnorm_at_the_same_weights_and_trains_the_same():
    """Pre-RMSNorm (Jiang et al. 2023): with the residual stream's mean held at zero, LayerNorm and RMSNorm
    compute the same function of the same weights, so their logits and their training runs agree."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, center_residual=True)
    layer_norm = perturbed(GPT(cfg))
    rms_norm = GPT(dataclasses.replace(cfg, norm="rmsnorm"))
    rms_norm.load_state_dict(layer_norm.state_dict())
    x = torch.randint(0, 64, (4, 9))
    assert (layer_norm.eval()(x[:, :-1]) - rms_norm.eval()(x[:, :-1])).abs().max() <= 1e-5
    uncentered = GPT(CFG)
    uncentered.load_state_dict(layer_norm.state_dict())
    plain_rms = GPT(dataclasses.replace(CFG, norm="rmsnorm"))
    plain_rms.load_state_dict(layer_norm.state_dict())
    assert (uncentered(x[:, :-1]) - plain_rms(x[:, :-1])).abs().max() > 1e-3, "without centering the two differ"

    assert (train_curve(layer_norm, x, 20) - train_curve(rms_norm, x, 20)).abs().max() <= 1e-4


def test_center_residual_is_for_pre_ln_without_bias():
    with pytest.raises(ValueError, match="center_residual needs norm_placement: pre and bias: false"):
        GPTConfig(center_residual=True, norm_placement="normformer")
    with pytest.raises(ValueError, match="center_residual needs"):
        GPTConfig(center_residual=True, bias=True)


def test_default_is_gpt2_shaped_and_starts_near_uniform():
    torch.manual_seed(0)
    model = GPT(CFG)
    assert model.lm_head.weight is model.wte.weight and model.wpe is not None
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 64, (4, 9))
    loss = model.loss(x[:, :-1], x[:, 1:])
    assert loss.item() == pytest.approx(math.log(64), rel=0.1)


def test_variants_own_their_layers():
    untied = GPT(dataclasses.replace(CFG, tie_embeddings=False, positions="rope"))
    assert untied.lm_head.weight is not untied.wte.weight and untied.wpe is None
    assert "rope_cos" not in untied.state_dict(), "rope tables are derived, not saved"
    mix = GPT(dataclasses.replace(CFG, n_layer=8, norm_placement="mix_ln", mix_ln_fraction=0.25))
    assert [b.placement for b in mix.h] == ["post"] * 2 + ["pre"] * 6
    assert isinstance(GPT(dataclasses.replace(CFG, norm_placement="post")).ln_f, nn.Identity)
    swiglu = GPT(dataclasses.replace(CFG, activation="swiglu"))
    assert swiglu.h[0].mlp.c_fc.out_features == 2 * 48  # 8/3 * 16, rounded up to a multiple of 8


def test_deepnorm_and_sub_ln_scale_their_residual_branches_at_init():
    def std(placement, pick):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(CFG, n_layer=4, norm_placement=placement))
        return pick(model.h[0]).std().item()

    fc = lambda b: b.mlp.c_fc.weight  # noqa: E731
    q = lambda b: b.attn.c_attn.weight[:16]  # noqa: E731
    assert std("deepnorm", fc) == pytest.approx(0.02 * 32**-0.25, rel=0.1)
    assert std("sub_ln", fc) == pytest.approx(0.02 * math.sqrt(math.log(8)), rel=0.1)
    assert std("deepnorm", q) == pytest.approx(0.02, rel=0.1), "queries and keys keep the base init"


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, positions="rope")).eval()
    x = torch.randint(0, 64, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 64
    assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-6)
    assert not torch.allclose(model(x)[0, 5:], model(y)[0, 5:])


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        GPT(CFG)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="even head size"):
        GPTConfig(n_embd=6, n_head=2, positions="rope")


def test_greedy_generation_is_deterministic_and_respects_block_size():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    prompt = torch.randint(0, 64, (1, 3))
    a, b = model.generate(prompt, 10, temperature=0), model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 13) and torch.equal(a, b)
    # decoding reads the last position's logits alone: the same as the full forward's last row
    torch.testing.assert_close(model(a[:, :8], last_only=True), model(a[:, :8])[:, -1:])
    assert torch.equal(a[0, 3:], torch.stack([model(a[:, max(i - 8, 0) : i])[0, -1].argmax() for i in range(3, 13)]))


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_head_loss_is_cross_entropy_on_the_logits(tied):
    """GPT.loss runs the head a chunk of rows at a time, the gradient written in the forward: the same loss and
    gradients as autograd through the whole logits, over several chunks and a ragged last one."""
    cfg = dataclasses.replace(CFG, vocab_size=8192, tie_embeddings=tied)  # chunks of 64 rows on the CPU
    torch.manual_seed(0)
    model = GPT(cfg).double()
    x, y = torch.randint(0, cfg.vocab_size, (2, 2, cfg.block_size)).unbind()
    x, y = x.repeat(10, 1)[:19], y.repeat(10, 1)[:19]  # 152 rows: 64 + 64 + 24
    reference = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # in fp64, as the model
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model.loss(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
