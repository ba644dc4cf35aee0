"""The common model directory: model.safetensors, config.json, tokenizer.json, README.md (a card with lineage).

Quantized models keep their packed bytes on disk: torchao int8 tensors flattened by torchao's safetensors
support; lm.packed's int4 modules as their uint8 codes, fp16 scales and uint8 zero points. config.json names the
quantization so loading rebuilds the same modules.
"""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from lm import packed
from lm.gpt import GPT, GPTConfig

WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", "config.json", "tokenizer.json", "README.md"


def save(model: GPT, out_dir: Path, tokenizer_file: str | Path, card: dict, quantization: dict | None = None) -> None:
    """Write the four files into out_dir (which the caller makes atomic).
    quantization: {"method": "int8"} (torchao) or {"method": ..., "bits": b, "group_size": g} (lm.packed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if quantization and quantization["method"] == "int8":
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(untied_state_dict(model))
        save_file(tensors, out_dir / WEIGHTS, metadata=metadata)
    elif quantization:
        save_file({k: v.contiguous() for k, v in untied_state_dict(model).items()}, out_dir / WEIGHTS)
    else:
        save_model(model, str(out_dir / WEIGHTS))
    config = {"architecture": "GPT", "model": asdict(model.config), "quantization": quantization}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, out_dir / TOKENIZER)
    (out_dir / CARD).write_text(model_card(card))


def untied_state_dict(model: GPT) -> dict:
    # a tied head shares the embedding's tensor: store it once, under the embedding's name
    tied = model.config.tie_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k.startswith("lm_head."))}


def model_card(card: dict) -> str:
    lines = [f"# {card.get('name', 'model')}", "", card.get("description", ""), "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card.items() if k not in ("name", "description")]
    return "\n".join(lines) + "\n"


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / CONFIG).read_text())


def load(model_dir: str | Path) -> GPT:
    """The model in model_dir, on CPU, in eval mode."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = GPT(GPTConfig(**config["model"]))
    quantization = config["quantization"]
    if not quantization:
        load_model(model, model_dir / WEIGHTS)
        return model.eval()
    with safe_open(model_dir / WEIGHTS, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    if quantization["method"] == "int8":
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        state, leftover = unflatten_tensor_state_dict(state, metadata)
        state |= leftover
    else:
        packed.convert(model, quantization["bits"], quantization["group_size"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = model.config.tie_embeddings
    if unexpected or any(not (tied and k.startswith("lm_head.")) for k in missing):
        raise ValueError(f"{model_dir / WEIGHTS}: missing {missing}, unexpected {unexpected}")
    if tied and quantization["method"] == "int8":
        model.lm_head.weight = model.wte.weight
    elif tied:
        model.lm_head.share(model.wte)
    return model.eval()


def card_files(model_dir: str | Path) -> list[Path]:
    """The small files that describe a model: worth logging with every run, unlike the weights."""
    return [Path(model_dir) / CARD, Path(model_dir) / CONFIG]


def weights_digest(model_dir: str | Path) -> str:
    """sha256 of the weights file: identifies a model's exact weights."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_bytes(model_dir: str | Path) -> int:
    return (Path(model_dir) / WEIGHTS).stat().st_size


@torch.no_grad()
def sparsity(model: GPT) -> float:
    """Fraction of zeros among the weights of the blocks' Linear layers."""
    weights = [m.weight for m in model.h.modules() if isinstance(m, torch.nn.Linear)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def param_counts(model: GPT) -> tuple[int, int]:
    """(all, non-zero) parameters, a shared (tied) tensor once; a quantized weight counts the values it stores."""
    seen, total, nonzero = set(), 0, 0
    for module in model.modules():
        tensors = [(p, p.dequantize()) for p in module.parameters(recurse=False)]
        if isinstance(module, packed.QuantizedWeight):
            tensors.append((module.codes, module.weight))
        for key, dense in tensors:
            if id(key) not in seen:
                seen.add(id(key))
                total += dense.numel()
                nonzero += int(torch.count_nonzero(dense))
    return total, nonzero
