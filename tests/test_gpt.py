import pytest
import torch

from lm.gpt import GPT, GPTConfig
from lm.lit import next_token_loss

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)


def test_forward_shape_and_tied_head():
    torch.manual_seed(0)
    model = GPT(CFG)
    logits = model(torch.randint(0, 64, (3, 8)))
    assert logits.shape == (3, 8, 64)
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, 64, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 64
    assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-6)
    assert not torch.allclose(model(x)[0, 5:], model(y)[0, 5:])


def test_context_longer_than_block_size_fails():
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        GPT(CFG)(torch.zeros(1, 9, dtype=torch.long))


def test_config_checks_heads_divide_width():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=10, n_head=3)


def test_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 9))
    losses = []
    for _ in range(30):
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.1)  # near-uniform at init
    assert losses[-1] < 0.5 * losses[0]


def test_greedy_generation_is_deterministic_and_respects_block_size():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    prompt = torch.randint(0, 64, (1, 3))
    a, b = model.generate(prompt, 10, temperature=0), model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 13) and torch.equal(a, b)
