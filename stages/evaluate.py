"""evaluate: score every model on the val tokens and compare them in one table.

Inputs:  every model directory (pretrain, distill, scratch, prune/<method>, quantize/<method>), ${paths.tokens}
Outputs: ${paths.reports}/evaluate.md (the table and a sample from each model)
Metrics: ${paths.metrics}/evaluate.json: per model (pretrain, distill, scratch, prune_<method>,
         quantize_<method>) val_loss, perplexity, bits_per_byte, params, nonzero_params, file_bytes,
         latency_ms_per_token
"""

import logging
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lm import model_dir
from lm.data import sequential_loader
from lm.gpt import GPT
from lm.lit import mean_loss
from stages import io
from stages.cli import stage_main
from stages.config import EvaluateConfig, Params, Paths
from stages.tokenize import load_tokens

log = logging.getLogger("stages.evaluate")

COLUMNS = (
    "val_loss",
    "perplexity",
    "bits_per_byte",
    "params",
    "nonzero_params",
    "file_bytes",
    "latency_ms_per_token",
)


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Nats per token -> bits per UTF-8 byte of text: comparable across tokenizers."""
    return loss_nats / math.log(2) * tokens_per_byte


@torch.no_grad()
def latency_ms_per_token(model: GPT, prompt_ids: list[int], n_tokens: int) -> float:
    idx = torch.tensor([prompt_ids])
    model.generate(idx, 2, temperature=0)  # warm-up
    t0 = time.perf_counter()
    model.generate(idx, n_tokens, temperature=0)
    return (time.perf_counter() - t0) / n_tokens * 1e3


def score(model: GPT, cfg: EvaluateConfig, paths: Paths, tok: Tokenizer, tokens_per_byte: float, model_path: str):
    val = load_tokens(paths.tokens, "val")
    loss = mean_loss(model, sequential_loader(val, model.config.block_size, cfg.batch_size, cfg.max_val_tokens))
    prompt = tok.encode(cfg.prompt).ids
    params, nonzero = model_dir.param_counts(model)  # a quantized weight counts its values, not its bytes
    metrics = {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": bits_per_byte(loss, tokens_per_byte),
        "params": params,
        "nonzero_params": nonzero,
        "file_bytes": model_dir.file_bytes(model_path),
        "latency_ms_per_token": latency_ms_per_token(model, prompt, cfg.latency_tokens),
    }
    torch.manual_seed(0)
    sample = tok.decode(model.generate(torch.tensor([prompt]), cfg.latency_tokens, temperature=0)[0].tolist())
    return metrics, sample


def table(results: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, m in results.items():
        cells = [f"{m[c]:,}" if isinstance(m[c], int) else f"{m[c]:.4g}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(params: Params) -> dict:
    cfg, paths = params.evaluate, params.paths
    torch.manual_seed(0)
    meta = io.read_json(Path(paths.tokens) / "meta.json")["splits"]["val"]
    tokens_per_byte = meta["tokens"] / meta["bytes"]
    tok = Tokenizer.from_file(str(Path(paths.tokens) / "tokenizer.json"))
    results, samples = {}, {}
    for name, path in params.models().items():
        results[name], samples[name] = score(model_dir.load(path), cfg, paths, tok, tokens_per_byte, path)
        log.info("evaluate: %s %s", name, {k: round(v, 4) for k, v in results[name].items()})
    report = ["# Evaluation", "", table(results), "", f"Samples (greedy) after `{cfg.prompt}`:", ""]
    report += [f"**{name}**\n```\n{text}\n```\n" for name, text in samples.items()]
    with io.atomic_file(Path(paths.reports) / "evaluate.md") as tmp:
        tmp.write_text("\n".join(report))
    print(table(results), flush=True)
    return results


def main() -> None:
    stage_main(
        "evaluate",
        lambda p, tracker: run(p),
        inputs=lambda p: [p.base_model, p.student_model, p.scratch_model, p.pruned_model, p.quantized_model, p.tokens],
        artifacts=lambda p: [f"{p.reports}/evaluate.md"],
    )


if __name__ == "__main__":
    main()
