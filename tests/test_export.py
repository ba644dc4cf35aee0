"""transformers exports compute the same logits as our model, and load with the Auto classes."""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm import io
from lm.export import architecture, export
from lm.gpt import GPT, GPTConfig

BASE = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320)
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope"}


def trained_like(cfg: GPTConfig) -> GPT:
    """A model with every weight, gain and bias away from its init, so a missed mapping shows."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    ("variant", "arch"),
    [
        ({}, "gpt2"),
        ({"bias": True}, "gpt2"),
        (LLAMA, "llama"),
        (LLAMA | {"tie_embeddings": False, "rope_base": 500.0}, "llama"),
    ],
)
def test_export_matches_our_logits(variant, arch, tmp_path, pipeline):
    p, _ = pipeline
    model = trained_like(dataclasses.replace(BASE, **variant))
    eos = io.read_json(Path(p.paths.tokens) / "meta.json")["eos_token"]
    assert export(model, Path(p.paths.tokens) / "tokenizer.json", eos, tmp_path / "hf") == arch
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == arch
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_encodes_like_ours(tmp_path, pipeline):
    p, _ = pipeline
    from tokenizers import Tokenizer

    export(trained_like(BASE), Path(p.paths.tokens) / "tokenizer.json", "<|endoftext|>", tmp_path / "hf")
    text = "Data model train token layer.\nLoss weight value."
    ours = Tokenizer.from_file(str(Path(p.paths.tokens) / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text)["input_ids"] == ours.encode(text).ids and hf_tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize(
    "variant", [{"norm_placement": "post"}, {"qk_norm": True}, {"activation": "relu2"}, {"tie_embeddings": False}]
)
def test_variants_without_a_transformers_architecture_are_not_exported(variant, tmp_path):
    cfg = dataclasses.replace(BASE, **variant)
    assert architecture(cfg) is None
    assert export(GPT(cfg), "unused", "eos", tmp_path / "hf") is None and not (tmp_path / "hf").exists()


def test_pretrain_stage_writes_a_loadable_export(pipeline):
    p, _ = pipeline
    hf_dir = Path(p.paths.model("pretrain")) / "hf"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.config.model_type == "gpt2"
    eos = io.read_json(Path(p.paths.tokens) / "meta.json")["eos_id"]
    for config in (hf.config, hf.generation_config):  # our EOS, not GPT-2's 50256
        assert config.eos_token_id == config.bos_token_id == config.pad_token_id == eos < hf.config.vocab_size
    assert "| transformers | gpt2 |" in (Path(p.paths.model("pretrain")) / "README.md").read_text()
