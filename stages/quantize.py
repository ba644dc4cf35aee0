"""quantize: torchao int8 weight-only quantization (one scale per output channel) of the pruned model.

Inputs:  ${paths.pruned_model}
Outputs: ${paths.quantized_model} (int8 weights and scales packed in model.safetensors)
Metrics: ${paths.metrics}/quantize.json: file sizes before and after, max weight error
"""

import logging
from pathlib import Path

import torch

from lm import model_dir
from lm.gpt import GPT
from stages import io
from stages.cli import stage_main
from stages.config import Paths, QuantizeConfig
from stages.tracking import git_commit

log = logging.getLogger("stages.quantize")


def quantize_int8(model: GPT) -> GPT:
    """Swap the blocks' Linear weights for torchao Int8Tensors; the head stays tied to the fp32 embedding."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model.h, Int8WeightOnlyConfig())
    return model


def run(cfg: QuantizeConfig, paths: Paths) -> dict:
    model = model_dir.load(paths.pruned_model)
    reference = {n: m.weight.detach().clone() for n, m in model.h.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_int8(model)
    max_error = max(
        (m.weight.dequantize() - reference[n]).abs().max().item() for n, m in model.h.named_modules() if n in reference
    )
    card = {
        "name": "quantize",
        "description": f"{cfg.method} quantization of the pruned model (torchao).",
        "source": paths.pruned_model,
        "git_commit": git_commit(),
    }
    with io.atomic_dir(paths.quantized_model) as tmp:
        model_dir.save(model, tmp, Path(paths.pruned_model) / model_dir.TOKENIZER, card, quantization=cfg.method)
    before, after = model_dir.file_bytes(paths.pruned_model), model_dir.file_bytes(paths.quantized_model)
    log.info("quantize: %d -> %d bytes (%.2fx), max weight error %.2e", before, after, after / before, max_error)
    return {"source_bytes": before, "file_bytes": after, "size_ratio": after / before, "max_weight_error": max_error}


def main() -> None:
    stage_main(
        "quantize",
        lambda p, tracker: run(p.quantize, p.paths),
        inputs=lambda p: [p.pruned_model],
        artifacts=lambda p: model_dir.card_files(p.quantized_model),
    )


if __name__ == "__main__":
    main()
