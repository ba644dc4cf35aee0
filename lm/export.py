"""Export to Hugging Face `transformers` where the architecture maps onto one it knows.

Pre-LN + LayerNorm + GELU + learned positions + tied embeddings -> GPT-2 (GPT2LMHeadModel, exact-erf "gelu");
Pre-LN + RMSNorm + SwiGLU + RoPE -> Llama (LlamaForCausalLM; our RoPE uses its half-split layout).
Other variants (Post-LN, NormFormer, QK-norm, ...) have no such architecture and are not exported.
transformers is imported only here, so training never needs it.
"""

from pathlib import Path

import torch

from lm.gpt import GPT, GPTConfig


def architecture(cfg: GPTConfig) -> str | None:
    """ "gpt2", "llama", or None where no transformers architecture computes the same function."""
    if cfg.norm_placement != "pre" or cfg.qk_norm or cfg.center_residual:
        return None
    if (cfg.norm, cfg.activation, cfg.positions, cfg.tie_embeddings) == ("layernorm", "gelu", "learned", True):
        return "gpt2"
    if (cfg.norm, cfg.activation, cfg.positions, cfg.bias) == ("rmsnorm", "swiglu", "rope", False):
        return "llama"
    return None


def _gpt2(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_hidden,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    ours = model.state_dict()

    def bias(name: str, size: int) -> torch.Tensor:
        return ours.get(name, torch.zeros(size))  # bias=False: GPT-2 always has biases, zero ones are the same

    state = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            state[f"{dst}{norm}.weight"] = ours[f"{src}{norm}.weight"]
            state[f"{dst}{norm}.bias"] = bias(f"{src}{norm}.bias", cfg.n_embd)
        # GPT-2's Conv1D stores (in, out): the transpose of a Linear's weight
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = ours[f"{src}{layer}.weight"]
            state[f"{dst}{layer}.weight"] = weight.T.contiguous()
            state[f"{dst}{layer}.bias"] = bias(f"{src}{layer}.bias", weight.shape[0])
    state["transformer.ln_f.weight"] = ours["ln_f.weight"]
    state["transformer.ln_f.bias"] = bias("ln_f.bias", cfg.n_embd)
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to wte
        raise ValueError(f"GPT-2 export: missing {missing}, unexpected {unexpected}")
    return hf


def _llama(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    ours, C, H = model.state_dict(), cfg.n_embd, cfg.mlp_hidden
    state = {
        "model.embed_tokens.weight": ours["wte.weight"],
        "model.norm.weight": ours["ln_f.weight"],
        "lm_head.weight": ours["lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"model.layers.{i}."
        qkv, fc = ours[f"{src}attn.c_attn.weight"], ours[f"{src}mlp.c_fc.weight"]
        state |= {
            f"{dst}self_attn.q_proj.weight": qkv[:C],
            f"{dst}self_attn.k_proj.weight": qkv[C : 2 * C],
            f"{dst}self_attn.v_proj.weight": qkv[2 * C :],
            f"{dst}self_attn.o_proj.weight": ours[f"{src}attn.c_proj.weight"],
            f"{dst}mlp.gate_proj.weight": fc[:H],
            f"{dst}mlp.up_proj.weight": fc[H:],
            f"{dst}mlp.down_proj.weight": ours[f"{src}mlp.c_proj.weight"],
            f"{dst}input_layernorm.weight": ours[f"{src}ln_1.weight"],
            f"{dst}post_attention_layernorm.weight": ours[f"{src}ln_2.weight"],
        }
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return hf


def to_transformers(model: GPT):
    """The equivalent transformers model, or None if the architecture has none."""
    arch = architecture(model.config)
    if arch is None:
        return None
    return (_gpt2 if arch == "gpt2" else _llama)(model.float().eval()).eval()


def export(model: GPT, tokenizer_file: str | Path, eos_token: str, out_dir: Path) -> str | None:
    """Write a transformers model + tokenizer into out_dir (loadable by AutoModelForCausalLM / AutoTokenizer);
    returns the architecture's name, or None (nothing written) where there is none."""
    hf = to_transformers(model)
    if hf is None:
        return None
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eos_token, bos_token=eos_token)
    # our EOS, not the architecture's default ids (GPT-2's 50256 is not even in a small vocabulary): generate()
    # stops at the end of a document, and padding uses a real token
    for config in (hf.config, hf.generation_config):
        config.bos_token_id = config.eos_token_id = config.pad_token_id = tok.eos_token_id
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return architecture(model.config)
