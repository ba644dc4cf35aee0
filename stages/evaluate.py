"""evaluate: score every model (or those evaluate.models lists) on the val tokens and compare them in one table.

Metrics, per model (pretrain, distill, scratch, prune_<method>, quantize_<method>): val_loss, perplexity,
bits_per_byte, params, nonzero_params, file_bytes, latency_ms_per_token (CPU), peak_memory_mb, val_loss_<domain>
for each domain of the val windows when there are several (a window's domain is its middle token's), and on a GPU
gpu_latency_ms_per_token; for a model made from another (distill, prune_<method>, quantize_<method>)
val_loss_delta and val_loss_delta_ci95 against its source. compare.json: the same difference for each pair in
evaluate.compare. reports/evaluate_windows.parquet: every model's val loss on each window (model, window,
val_loss, domain), so runs of other experiments pair with these window by window. The report: the table and each model's
samples from the fixed prompts; the plot: a row per model (size against bits per byte). In MLflow, each model's
metrics are also a child run of the stage's run, named after the model, and the metrics of the logged model its
stage made.
"""

import csv
import dataclasses
import logging
import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from tokenizers import Tokenizer

from lm import io, model_dir, stats, tables
from lm.gpt import GPT
from lm.scoring import domain_losses, sequential_loader, window_domains, window_losses
from lm.tokens import TOKENIZER, load_tokens, token_meta
from stages import cli, cost
from stages.config import EvaluateConfig, Params, Paths
from stages.tracking import Tracker, dvc_input_hashes

log = logging.getLogger("stages.evaluate")

WINDOWS_FILE = "evaluate_windows.parquet"

COLUMNS = (
    "val_loss",
    "perplexity",
    "bits_per_byte",
    "params",
    "nonzero_params",
    "file_bytes",
    "latency_ms_per_token",
    "peak_memory_mb",
)


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Nats per token -> bits per UTF-8 byte of text: comparable across tokenizers."""
    return loss_nats / math.log(2) * tokens_per_byte


@torch.no_grad()
def latency_ms_per_token(model: GPT, prompt_ids: list[int], n_tokens: int) -> float:
    """Greedy decoding time per token, batch 1, on the model's device."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], device=device)
    model.generate(idx, 2, temperature=0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(idx, n_tokens, temperature=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n_tokens * 1e3


@contextmanager
def peak_memory(peak: dict, device: str):
    """Sets peak["mb"]: on GPU torch's peak allocation; on CPU the peak resident memory above the level at entry,
    sampled every 2 ms (the model's weights, activations and what the allocator keeps)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield
        peak["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    process, done = psutil.Process(), threading.Event()
    baseline = highest = process.memory_info().rss

    def sample():
        nonlocal highest
        while not done.wait(0.002):
            highest = max(highest, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        peak["mb"] = (max(highest, process.memory_info().rss) - baseline) / 2**20


@torch.no_grad()
def samples(model: GPT, cfg: EvaluateConfig, tok: Tokenizer) -> dict[str, str]:
    """Each fixed prompt's continuation, drawn with a fixed seed."""
    torch.manual_seed(cfg.seed)
    out = {}
    for prompt in cfg.prompts:
        idx = torch.tensor([tok.encode(prompt).ids])
        top_k = None if cfg.temperature == 0 else cfg.top_k
        out[prompt] = tok.decode(model.generate(idx, cfg.sample_tokens, cfg.temperature, top_k)[0].tolist())
    return out


def score(
    model_path: str, cfg: EvaluateConfig, paths: Paths, tok: Tokenizer, tokens_per_byte: float, phases: cost.Phases
):
    """The model's row: loss and peak memory on the GPU when there is one, else the CPU; CPU latency always,
    and GPU latency (gpu_latency_ms_per_token) when there is a GPU."""
    val = load_tokens(paths.tokens, "val")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = tok.encode(cfg.prompts[0]).ids
    peak = {}
    with phases("loss"), peak_memory(peak, device):
        model = model_dir.load(model_path).to(device)
        losses = window_losses(
            model, sequential_loader(val, model.config.block_size, cfg.batch_size, cfg.max_val_tokens)
        )
    loss = losses.mean().item()
    domains = window_domains(paths.tokens, model.config.block_size, len(losses))
    gpu = {}
    with phases("latency"):
        if device == "cuda":
            gpu["gpu_latency_ms_per_token"] = latency_ms_per_token(model, prompt, cfg.latency_tokens)
        model = model.cpu()
        cpu_latency = latency_ms_per_token(model, prompt, cfg.latency_tokens)
    params, nonzero = model_dir.param_counts(model)  # a quantized weight counts its values, not its bytes
    metrics = {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": bits_per_byte(loss, tokens_per_byte),
        "params": params,
        "nonzero_params": nonzero,
        "file_bytes": model_dir.file_bytes(model_path),
        "latency_ms_per_token": cpu_latency,
        "peak_memory_mb": peak["mb"],
    }
    with phases("samples"):
        texts = samples(model, cfg, tok)
    return metrics | domain_losses(losses.numpy(), domains) | gpu, losses, domains, texts


def difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean val loss of a minus b, and the half-width of its 95% interval: paired window by window when both
    scored the same windows (the window-to-window spread, shared by both models, cancels; neighbouring windows of
    contiguous text correlate, so the interval comes from batch means over contiguous blocks), else unpaired."""
    if len(a) == len(b):
        d = (a - b).numpy()
        half = stats.batch_means(d).half_width if len(d) >= 4 else math.inf
        return {"val_loss_delta": float(d.mean()), "val_loss_delta_ci95": half}
    spread = (a.var() / len(a) + b.var() / len(b)).sqrt().item() if min(len(a), len(b)) > 1 else math.inf
    return {"val_loss_delta": (a.mean() - b.mean()).item(), "val_loss_delta_ci95": 1.96 * spread}


def table(results: dict[str, dict]) -> str:
    columns = list(dict.fromkeys(c for m in results.values() for c in m))  # COLUMNS, + GPU latency on a GPU
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, m in results.items():
        cells = ["" if c not in m else f"{m[c]:,}" if isinstance(m[c], int) else f"{m[c]:.4g}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(results: dict[str, dict], path: Path) -> None:
    """One row per model: what `dvc plots` draws as size against bits per byte."""
    with io.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "file_bytes", "nonzero_params", "bits_per_byte"])
        for name, m in results.items():
            writer.writerow([name, m["file_bytes"], m["nonzero_params"], round(m["bits_per_byte"], 5)])


def comparison_table(compared: dict[str, dict]) -> str:
    lines = ["| a − b | val loss difference | 95% interval | |", "|---|---:|---:|---|"]
    for pair, d in compared.items():
        delta, half = d["val_loss_delta"], d["val_loss_delta_ci95"]
        verdict = stats.pair_verdict(delta, half)
        lines.append(f"| {pair.replace('_vs_', ' − ')} | {delta:+.4f} | ±{half:.4f} | {verdict} |")
    return "\n".join(lines)


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


class GateFailed(io.DataError):
    """A model missed a threshold of evaluate.gates (gates_mode: fail)."""


def gate_failures(results: dict[str, dict], params: Params) -> dict[str, list[str]]:
    """Each gated model's missed thresholds, one line each naming the model, metric, threshold and value. The
    val loss increase is judged on the upper end of its interval: a model passes only when the data show it
    within the threshold."""
    failures: dict[str, list[str]] = {}
    for name, gate in params.evaluate.gates.items():
        model = params.by_role(name)
        row = results[model]
        increase = row.get("val_loss_delta", 0.0) + row.get("val_loss_delta_ci95", 0.0)
        checks = (
            ("val_loss_delta + val_loss_delta_ci95", increase, "max_val_loss_increase", gate.max_val_loss_increase),
            ("file_bytes", row["file_bytes"], "max_file_bytes", gate.max_file_bytes),
            ("latency_ms_per_token", row["latency_ms_per_token"], "max_latency_ms", gate.max_latency_ms),
        )
        for metric, value, key, threshold in checks:
            if value > threshold:
                line = f"{model}: {metric} {number(value)} > evaluate.gates.{name}.{key} {number(threshold)}"
                failures.setdefault(model, []).append(line)
    return failures


def gates_table(params: Params, failures: dict[str, list[str]]) -> list[str]:
    cfg = params.evaluate
    if not cfg.gates:
        return []
    lines = [f"## Gates ({cfg.gates_mode})", "", "| model | gate | result |", "|---|---|---|"]
    for name, gate in cfg.gates.items():
        model = params.by_role(name)
        set_ = {k: v for k, v in dataclasses.asdict(gate).items() if v != math.inf}
        result = "; ".join(failures[model]) if model in failures else "passed"
        lines.append(f"| {model} | {', '.join(f'{k} {v:g}' for k, v in set_.items())} | {result} |")
    return [*lines, ""]


def promote(results: dict[str, dict], failures: dict[str, list[str]], params: Params, tracker: Tracker) -> None:
    """The role aliases, and `champion`, onto the versions of the models that passed their gates."""
    champion = params.by_role(params.evaluate.champion) if params.evaluate.champion else None
    for model in results:
        if model in failures:
            continue
        role = params.model_tags(model)["role"]
        aliases = ([role] if role != "-" else []) + (["champion"] if model == champion else [])
        tracker.promote(params.models()[model], params.run.experiment, aliases)


def report(
    results: dict[str, dict],
    compared: dict[str, dict],
    texts: dict[str, dict[str, str]],
    cfg: EvaluateConfig,
    gates: list[str],
) -> str:
    lines = ["# Evaluation", "", table(results), "", *gates]
    lines += [
        "val_loss_delta: a model's val loss minus that of the model it was made from (distill: its teacher;"
        " prune_* and quantize_*: their stage's `source`); val_loss_delta_ci95: the half-width of its 95% interval,"
        " paired over the same val windows (batch means over contiguous blocks of windows, lm/stats.py).",
        "",
    ]
    lines += ["Val loss differences (nats per token) between the pairs in evaluate.compare:", ""]
    lines += [comparison_table(compared), ""]
    lines += [f"Samples: temperature {cfg.temperature}, top-k {cfg.top_k}, seed {cfg.seed}.", ""]
    for name, by_prompt in texts.items():
        lines += [f"## {name}", ""]
        lines += [f"```\n{text}\n```\n" for text in by_prompt.values()]
    return "\n".join(lines)


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.evaluate, params.paths
    meta = token_meta(paths.tokens)["splits"]["val"]
    tokens_per_byte = meta["tokens"] / meta["bytes"]
    tok = Tokenizer.from_file(str(Path(paths.tokens) / TOKENIZER))
    results, losses, domains, texts = {}, {}, {}, {}
    phases = cost.Phases()
    for name, path in params.evaluated().items():
        results[name], losses[name], domains[name], texts[name] = score(path, cfg, paths, tok, tokens_per_byte, phases)
        log.info("evaluate: %s %s", name, {k: round(v, 4) for k, v in results[name].items()})
    with phases("report"):  # the comparisons, tables, plot, child runs and promotion
        for name, source in params.made_from().items():
            if name in losses and source in losses:
                results[name] |= difference(losses[name], losses[source])
        compared = {f"{a}_vs_{b}": difference(losses[a], losses[b]) for a, b in cfg.compare if {a, b} <= losses.keys()}
        io.write_json(Path(paths.metrics) / "compare.json", compared)
        tables.write_window_losses(
            {name: loss.numpy() for name, loss in losses.items()}, domains, Path(paths.reports) / WINDOWS_FILE
        )
        failures = gate_failures(results, params)
        for name in params.evaluate.gates:
            results[params.by_role(name)]["gates_passed"] = int(params.by_role(name) not in failures)
        with io.atomic_file(Path(paths.reports) / "evaluate.md") as tmp:
            tmp.write_text(report(results, compared, texts, cfg, gates_table(params, failures)))
        write_plot(results, Path(paths.plots) / "evaluate.csv")
        print(table(results), flush=True)
        log_rows(results, params, tracker)
        promote(results, failures, params, tracker)
    lines = [line for model_lines in failures.values() for line in model_lines]
    if lines and cfg.gates_mode == "fail":
        raise GateFailed("gate failed: " + "; ".join(lines))
    for line in lines:
        log.warning("gate failed (gates_mode: warn): %s", line)
    return results | {cost.PHASES: phases}


def log_rows(results: dict[str, dict], params: Params, tracker: Tracker) -> None:
    """One child run per model, all with the same metric names (the MLflow compare view's rows), its metrics also
    the model's: the logged model its stage made of the same files, measured on the val tokens."""
    tokens = params.paths.tokens
    for name, metrics in results.items():
        path = params.models()[name]
        tracker.start_child(name, params.model_tags(name))
        tracker.log_inputs(dvc_input_hashes([tokens]), context="eval", child=name)
        tracker.log_metrics(metrics, child=name, model_dir=path, dataset=tokens)


if __name__ == "__main__":
    cli.main(run)
