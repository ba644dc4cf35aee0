"""Contracts of every stage's run() on the tiny corpus (the session fixture `pipeline` runs them in order)."""

import base64
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import models_beside
from safetensors import safe_open
from tokenizers import Tokenizer

from lm import io, model_dir, tables
from lm.curation import is_val
from lm.tokens import load_tokens
from stages import cost, curate, distill, pretrain, prune
from stages.config import ConfigError, parse_params
from stages.evaluate import COLUMNS, bits_per_byte
from stages.tracking import NO_TRACKING

ROOT = Path(__file__).resolve().parents[1]


def test_ingest_writes_schema_checked_documents(pipeline):
    p, m = pipeline
    df = tables.read_shards(p.paths.raw, tables.RAW_DOCS)
    assert m["ingest"]["documents"] == len(df) == 83
    assert set(df["source"]) == {"synthetic"}


def test_curate_removes_duplicates_short_and_non_text_and_splits_by_id(pipeline):
    p, m = pipeline
    steps = m["curate"]["steps"]
    assert steps["exact_dedup"]["in"]["documents"] - steps["exact_dedup"]["out"]["documents"] == 1
    assert steps["min_chars"]["in"]["documents"] - steps["min_chars"]["out"]["documents"] == 1
    assert steps["min_alpha_fraction"]["in"]["documents"] - steps["min_alpha_fraction"]["out"]["documents"] == 1
    train = tables.read_shards(Path(p.paths.curated) / "train", tables.CURATED_DOCS)
    val = tables.read_shards(Path(p.paths.curated) / "val", tables.CURATED_DOCS)
    assert len(train) + len(val) == 80 and not set(train["id"]) & set(val["id"])
    assert all(is_val(i, p.curate.val_fraction) for i in val["id"])
    report = io.read_json(Path(p.paths.reports) / "curate.json")
    assert "short.txt" in report["min_chars"]["removed_examples"][0]["location"]
    lengths = pd.read_csv(Path(p.paths.plots) / "curate_lengths.csv")
    assert lengths["before"].sum() == 83 and lengths["after"].sum() == 80, "every document in one bin"
    assert list(lengths["chars"]) == [2**k for k in range(4, 4 + len(lengths))]
    short = len("Too short to keep.\n")  # 19 characters: the (16, 32] bin, gone after curation
    assert lengths.set_index("chars").loc[32].tolist() == [1, 0] and short <= 32


def test_curate_on_everything_filtered_is_a_clear_error(tmp_path, pipeline):
    p, _ = pipeline
    cfg = type(p.curate)(min_chars=10**6, max_chars=10**7)
    paths = type(p.paths)(raw=p.paths.raw, curated=str(tmp_path / "c"), reports=str(tmp_path))
    with pytest.raises(io.DataError, match="no document of 83 .* survived"):
        curate.run(dataclasses.replace(p, curate=cfg, paths=paths), NO_TRACKING)


def test_tokenize_writes_token_files_with_eos_between_documents(pipeline):
    p, m = pipeline
    tokens = Path(p.paths.tokens)
    meta = io.read_json(tokens / "meta.json")
    tok = Tokenizer.from_file(str(tokens / "tokenizer.json"))
    assert meta["vocab_size"] == tok.get_vocab_size() <= 320 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        ids = load_tokens(tokens, split)[:]
        assert len(ids) == meta["splits"][split]["tokens"] == sum(s["tokens"] for s in meta["splits"][split]["shards"])
        assert (ids == meta["eos_id"]).sum() == meta["splits"][split]["documents"] and ids[-1] == meta["eos_id"]
    val_text = tables.read_shards(Path(p.paths.curated) / "val", tables.CURATED_DOCS)["text"][0]
    assert tok.decode(tok.encode(val_text).ids) == val_text  # byte-level BPE is lossless


def test_tokens_are_the_same_for_any_number_of_workers_and_read_as_one_stream(pipeline, tmp_path):
    from stages import tokenize

    p, _ = pipeline
    curated = tmp_path / "curated"
    for split in ("train", "val"):  # several curated shards, so that two workers share them
        docs = tables.read_shards(Path(p.paths.curated) / split, tables.CURATED_DOCS)
        tables.write_shards(docs, curated / split, tables.CURATED_DOCS, shard_rows=-(-len(docs) // 3))
    outs = {}
    for workers in (1, 2):
        cfg = dataclasses.replace(p.tokenize, vocab_size=300, workers=workers)
        paths = dataclasses.replace(p.paths, curated=str(curated), tokens=str(tmp_path / f"tok{workers}"))
        tokenize.run(dataclasses.replace(p, tokenize=cfg, paths=paths), NO_TRACKING)
        outs[workers] = {f.name: f.read_bytes() for f in sorted((tmp_path / f"tok{workers}").iterdir())}
    assert outs[1] == outs[2] and {"train-00002.bin", "val-00000.bin", "meta.json"} <= outs[1].keys()
    meta = io.read_json(tmp_path / "tok1" / "meta.json")
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == [f"train-0000{i}.bin" for i in range(3)]
    tok = Tokenizer.from_file(str(tmp_path / "tok1" / "tokenizer.json"))
    texts = tables.read_shards(curated / "train", tables.CURATED_DOCS)["text"]
    expected = np.concatenate([np.array([*tok.encode(t).ids, meta["eos_id"]], np.uint16) for t in texts])
    stream = load_tokens(tmp_path / "tok1", "train")
    assert len(stream) == len(expected) and (stream[:] == expected).all(), "the shards in order: one stream"
    first = meta["splits"]["train"]["shards"][0]["tokens"]
    assert (stream[first - 5 : first + 5] == expected[first - 5 : first + 5]).all(), "a window across two shards"
    assert stream[first] == expected[first] and stream[-1] == meta["eos_id"]
    shard = tmp_path / "tok1" / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(io.DataError, match=r"train-00001.bin: \d+ bytes, but meta.json indexes \d+ uint16 tokens"):
        load_tokens(tmp_path / "tok1", "train")


def test_two_domains_are_recorded_scored_apart_and_upsampled_at_the_end(pipeline, tmp_path):
    from stages import tokenize

    p, _ = pipeline
    curated = tmp_path / "curated"
    for split in ("train", "val"):  # every third document relabelled docs
        docs = tables.read_shards(Path(p.paths.curated) / split, tables.CURATED_DOCS)
        docs["domain"] = ["docs" if i % 3 == 0 else "prose" for i in range(len(docs))]
        tables.write_shards(docs, curated / split, tables.CURATED_DOCS, shard_rows=len(docs))
    paths = dataclasses.replace(
        p.paths,
        curated=str(curated),
        tokens=str(tmp_path / "tok"),
        models=str(tmp_path / "models"),
        plots=str(tmp_path),
        reports=str(tmp_path),
        checkpoints=str(tmp_path / "ckpt"),
    )
    metrics = tokenize.run(dataclasses.replace(p, paths=paths), NO_TRACKING)
    assert set(metrics["val"]["domain_tokens"]) == {"docs", "prose"}
    assert sum(metrics["val"]["domain_tokens"].values()) == metrics["val"]["tokens"]
    train = dataclasses.replace(p.pretrain.train, max_steps=6, final_mixture={"docs": 3.0}, final_fraction=0.5)
    result = pretrain.run(
        dataclasses.replace(p, paths=paths, pretrain=dataclasses.replace(p.pretrain, train=train)), NO_TRACKING
    )
    windows = tables.read_shard(tmp_path / "pretrain_windows.parquet", tables.WINDOW_LOSSES)
    by_domain = windows.groupby("domain")["val_loss"]
    assert result["val_loss_docs"] == pytest.approx(by_domain.mean()["docs"])
    assert result["val_loss_prose"] == pytest.approx(by_domain.mean()["prose"])
    assert result["val_loss"] == pytest.approx(windows["val_loss"].mean())
    unknown = dataclasses.replace(train, final_mixture={"web": 2.0})
    with pytest.raises(ConfigError, match=r"final_mixture: no train tokens of domain \['web'\]"):
        pretrain.run(
            dataclasses.replace(p, paths=paths, pretrain=dataclasses.replace(p.pretrain, train=unknown)), NO_TRACKING
        )


def test_tokenizer_with_special_tokens_from_a_sample_loads_in_transformers(pipeline, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from stages import tokenize

    p, _ = pipeline
    cfg = type(p.tokenize)(vocab_size=300, special_tokens=("<|pad|>", "<|user|>"), train_sample_bytes=20_000)
    paths = type(p.paths)(curated=p.paths.curated, tokens=str(tmp_path / "tok"))
    tokenize.run(dataclasses.replace(p, tokenize=cfg, paths=paths), NO_TRACKING)
    meta = io.read_json(tmp_path / "tok" / "meta.json")
    assert meta["special_tokens"] == ["<|endoftext|>", "<|pad|>", "<|user|>"] and meta["eos_id"] == 0
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"), eos_token="<|endoftext|>")
    ours = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    text = "def f(x):\n    return x <|user|> café"
    assert hf(text)["input_ids"] == ours.encode(text).ids and hf.eos_token_id == 0
    assert hf.convert_ids_to_tokens(ours.encode("<|user|>").ids) == ["<|user|>"], "special: never split"
    train = Path(p.paths.curated) / "train"
    everything = list(tables.read_shards(train, tables.CURATED_DOCS)["text"])
    assert list(tokenize.training_sample(p.paths, 0)) == everything
    total = tokenize.text_bytes(train)
    assert abs(total - sum(len(t.encode()) for t in everything)) < 0.05 * total, "the footers' sizes: about the text's"
    sample = list(tokenize.training_sample(p.paths, total // 4))
    assert 0.5 < sum(len(t.encode()) for t in sample) / (total // 4) < 1.5, "about sample_bytes (few documents here)"
    halves = everything[: len(everything) // 2], everything[len(everything) // 2 :]
    assert all(len(set(sample) & set(half)) > 0.15 * len(half) for half in halves), "drawn from the whole split"
    assert tokenize.token_dtype(2**16) == np.uint16 and tokenize.token_dtype(2**16 + 1) == np.uint32


def test_pretrain_saves_a_loadable_model_whose_loss_fell(pipeline):
    p, m = pipeline
    files = {f.name for f in Path(p.paths.model("pretrain")).iterdir()}
    assert files == {"model.safetensors", "config.json", "tokenizer.json", "README.md", "hf"}
    model = model_dir.load(p.paths.model("pretrain"))
    assert model.config.n_layer == 1 and model.config.vocab_size % 64 == 0
    with open(Path(p.paths.plots) / "pretrain_loss.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == list(range(5, 31, 5))
    assert float(curve[-1]["train_loss"]) < float(curve[0]["train_loss"])
    assert all(float(r["grad_norm"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in curve)
    assert all(0 < float(r["mfu"]) < 1.5 for r in curve), "MFU against this machine's measured fp32 GEMM peak"
    assert m["pretrain"]["tokens"] == 30 * 8 * 32
    assert m["pretrain"]["train_flops"] == m["pretrain"]["tokens"] * model.flops_per_token()
    assert m["pretrain"]["val_loss"] < np.log(model.config.vocab_size)
    with open(Path(p.paths.plots) / "pretrain_val.csv") as f:
        [final] = list(csv.DictReader(f))  # val_every 0: the final validation only
    assert int(final["step"]) == 30 and float(final["val_loss"]) == pytest.approx(m["pretrain"]["val_loss"])


def test_pretrain_continues_from_init_from_and_refuses_another_shape(pipeline, tmp_path):
    p, m = pipeline
    paths = dataclasses.replace(
        p.paths,
        models=str(tmp_path / "models"),
        plots=str(tmp_path),
        reports=str(tmp_path),
        checkpoints=str(tmp_path / "ckpt"),
    )
    train = dataclasses.replace(p.pretrain.train, max_steps=2, log_every=1, warmup_steps=0)
    cfg = dataclasses.replace(p.pretrain, train=train, init_from=p.paths.model("pretrain"))
    continued = pretrain.run(dataclasses.replace(p, pretrain=cfg, paths=paths), NO_TRACKING)
    with open(tmp_path / "pretrain_loss.csv") as f:
        first_loss = float(next(csv.DictReader(f))["train_loss"])
    assert first_loss < m["pretrain"]["final_train_loss"] + 0.5 < np.log(320), "it starts where the source ended"
    assert continued["val_loss"] < m["pretrain"]["val_loss"] + 0.1
    assert "continued from" in (tmp_path / "models" / "pretrain" / "README.md").read_text()
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=48))
    with pytest.raises(ConfigError, match=r"init_from .*pretrain: its model differs .*n_embd 32 \(configured: 48\)"):
        pretrain.run(dataclasses.replace(p, pretrain=wider, paths=paths), NO_TRACKING)


def test_distill_student_is_smaller_and_learns(pipeline):
    p, m = pipeline
    assert m["distill"]["parameters"] < m["pretrain"]["parameters"]
    assert m["distill"]["val_loss"] < np.log(320)
    assert "teacher" in (Path(p.paths.model("distill")) / "README.md").read_text()


def test_scratch_control_starts_from_the_students_weights_and_sees_the_same_tokens(pipeline):
    p, m = pipeline
    distilled, control = model_dir.load(p.paths.model("distill")), model_dir.load(p.paths.model("scratch"))
    assert distilled.config == control.config
    with open(Path(p.paths.plots) / "scratch_loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [5, 10]
    assert m["scratch"]["parameters"] == m["distill"]["parameters"]


def test_every_prune_method_writes_its_model_with_the_sparsity_it_promises(pipeline):
    p, m = pipeline
    assert set(m["prune"]) == set(p.prune.methods)
    for method in ("magnitude", "wanda"):
        assert m["prune"][method]["sparsity"] == pytest.approx(p.prune.sparsity, abs=0.01)
    with safe_open(Path(p.paths.model("prune")) / "nm" / "model.safetensors", "pt") as f:
        w = f.get_tensor("h.0.mlp.c_fc.weight")
    assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), "exactly 2 of every 4 weights kept"
    assert "val_loss_after_recovery" in m["prune"]["nm"] and "val_loss_after_recovery" not in m["prune"]["wanda"]
    assert m["prune"]["layers"]["n_layer"] == 1
    assert m["prune"]["heads"]["nonzero_params"] < m["prune"]["heads"]["params"]


def test_prune_scores_its_source_and_every_pruned_model_on_the_recovery_windows(pipeline):
    p, m = pipeline
    windows = tables.read_shard(Path(p.paths.reports) / "prune_windows.parquet", tables.WINDOW_LOSSES)
    by_model = windows.groupby("model")["val_loss"]
    assert set(by_model.groups) == {p.prune.source, *(f"prune_{method}" for method in p.prune.methods)}
    assert set(by_model.size()) == {p.prune.recovery.val_batches * p.prune.recovery.batch_size}
    for method, metrics in m["prune"].items():
        assert by_model.mean()[f"prune_{method}"] == pytest.approx(metrics["val_loss"])
    assert m["prune"]["nm"]["val_loss"] == pytest.approx(m["prune"]["nm"]["val_loss_after_recovery"])


def test_the_dense_control_is_the_source_trained_by_the_recovery_steps_alone(pipeline, tmp_path):
    p, m = pipeline
    paths = dataclasses.replace(
        p.paths, models=models_beside(p, tmp_path / "models", p.prune.source), reports=str(tmp_path)
    )
    results = {}
    for seed in (1, 2):
        cfg = dataclasses.replace(p.prune, methods=("magnitude", "wanda", "dense"), recover=("dense",), seed=seed)
        ran = prune.run(dataclasses.replace(p, prune=cfg, paths=paths), NO_TRACKING)
        assert set(ran.pop(cost.PHASES)) == {"source", "prune", "recovery", "save_and_score"}, "where the time went"
        assert list(ran) == ["magnitude", "wanda", "dense"]
        results[seed] = ran["dense"]
    source = model_dir.load(p.models()[p.prune.source])
    dense = model_dir.load(tmp_path / "models" / "prune" / "dense")
    assert results[2]["sparsity"] == pytest.approx(model_dir.sparsity(source)), "nothing pruned"
    assert not torch.equal(dense.lm_head.weight, source.lm_head.weight), "but trained"
    assert results[1]["val_loss"] != results[2]["val_loss"], "prune.seed orders the recovery's data"
    first = tables.read_shard(Path(p.paths.reports) / "prune_windows.parquet", tables.WINDOW_LOSSES)
    again = tables.read_shard(tmp_path / "prune_windows.parquet", tables.WINDOW_LOSSES)
    source_losses = [t[t["model"] == p.prune.source]["val_loss"].to_numpy() for t in (first, again)]
    np.testing.assert_array_equal(*source_losses)  # the same windows each run: arms pair window by window


def test_evaluate_scores_only_the_listed_models(pipeline, tmp_path):
    from stages import evaluate

    p, m = pipeline
    paths = dataclasses.replace(p.paths, reports=str(tmp_path), metrics=str(tmp_path), plots=str(tmp_path))
    cfg = dataclasses.replace(p.evaluate, models=("distill", "prune_wanda", "prune_magnitude"), gates={})
    results = evaluate.run(dataclasses.replace(p, evaluate=cfg, paths=paths), NO_TRACKING)
    assert set(results.pop(cost.PHASES)) == {"loss", "latency", "samples", "report"}, "where the time went"
    assert list(results) == ["distill", "prune_wanda", "prune_magnitude"]
    assert results["prune_wanda"]["val_loss"] == pytest.approx(m["evaluate"]["prune_wanda"]["val_loss"])
    assert "val_loss_delta" in results["prune_wanda"] and "val_loss_delta" not in results["distill"], "no pretrain"
    assert list(io.read_json(tmp_path / "compare.json")) == ["prune_wanda_vs_prune_magnitude"]


def test_quantize_stores_packed_weights_that_run(pipeline):
    p, m = pipeline
    with safe_open(Path(p.paths.model("quantize")) / "int8" / "model.safetensors", "pt") as f:
        assert f.get_tensor("h.0.mlp.c_fc._weight_qdata").dtype == torch.int8
    with safe_open(Path(p.paths.model("quantize")) / "int4_gptq" / "model.safetensors", "pt") as f:
        codes = f.get_tensor("h.0.mlp.c_fc.codes")
    assert codes.dtype == torch.uint8 and codes.shape[1] == 16 // 2, "two 4-bit codes per byte"
    reference = model_dir.load(Path(p.paths.model("prune")) / "wanda")
    x = torch.randint(0, 300, (1, 16))
    for method in p.quantize.methods:
        assert m["quantize"][method]["file_bytes"] < m["quantize"][method]["source_bytes"]
        model = model_dir.load(Path(p.paths.model("quantize")) / method)
        assert (model(x) - reference(x)).abs().max() < 1.0
    assert m["quantize"]["int4_gptq"]["file_bytes"] < m["quantize"]["int8"]["file_bytes"]


def test_evaluate_reports_every_model(pipeline):
    p, m = pipeline
    results = m["evaluate"]
    assert list(results) == list(p.models())
    assert {"distill", "scratch", "prune_wanda", "quantize_int4_gptq"} <= set(results)
    deltas = {"val_loss_delta", "val_loss_delta_ci95"}
    for name, row in results.items():
        assert set(row) == set(COLUMNS) | (deltas if name in p.made_from() else set())
        assert row["perplexity"] == pytest.approx(np.exp(row["val_loss"]))
        assert row["nonzero_params"] <= row["params"]
    block_weights = 12 * 16 * 16  # one block of width 16: qkv, attention out, MLP in and out
    removed = results["distill"]["nonzero_params"] - results["prune_magnitude"]["nonzero_params"]
    assert removed == block_weights * p.prune.sparsity
    assert results["quantize_int8"]["file_bytes"] < results["prune_wanda"]["file_bytes"]
    report = (Path(p.paths.reports) / "evaluate.md").read_text()
    assert "| quantize_int4_gptq |" in report and "## scratch" in report
    assert "| distill − scratch |" in report
    # the step's cost against its source, and each configured pair: the difference of the two val losses
    pruned = results["prune_wanda"]
    assert pruned["val_loss_delta"] == pytest.approx(pruned["val_loss"] - results["distill"]["val_loss"])
    compared = json.loads((Path(p.paths.metrics) / "compare.json").read_text())
    assert list(compared) == [f"{a}_vs_{b}" for a, b in p.evaluate.compare]
    delta = results["distill"]["val_loss"] - results["scratch"]["val_loss"]
    assert compared["distill_vs_scratch"]["val_loss_delta"] == pytest.approx(delta)
    assert compared["distill_vs_scratch"]["val_loss_delta_ci95"] > 0
    windows = tables.read_shard(Path(p.paths.reports) / "evaluate_windows.parquet", tables.WINDOW_LOSSES)
    assert list(windows["model"].unique()) == list(results), "every model, on the same windows"
    by_model = windows.groupby("model", sort=False)["val_loss"]
    assert by_model.mean().to_dict() == pytest.approx({name: row["val_loss"] for name, row in results.items()})
    assert by_model.size().nunique() == 1 and windows["window"].max() + 1 == by_model.size().iloc[0]
    assert all(row["peak_memory_mb"] > 0 for row in results.values())
    with open(Path(p.paths.plots) / "evaluate.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == list(results)
    json.dumps(results)


def test_samples_are_fixed_by_the_seed(pipeline):
    from stages.evaluate import samples

    p, _ = pipeline
    model = model_dir.load(p.paths.model("distill"))
    tok = Tokenizer.from_file(str(Path(p.paths.tokens) / "tokenizer.json"))
    first, again = samples(model, p.evaluate, tok), samples(model, p.evaluate, tok)
    assert first == again and list(first) == list(p.evaluate.prompts)
    assert all(text.startswith(prompt.strip()) for prompt, text in first.items())


def test_table_grows_a_gpu_latency_column_only_where_a_gpu_measured_one():
    from stages.evaluate import table

    cpu = dict.fromkeys(COLUMNS, 1.0)
    header = table({"a": cpu}).splitlines()[0]
    assert "gpu_latency_ms_per_token" not in header and header.count("|") == len(COLUMNS) + 2
    assert table({"a": cpu | {"gpu_latency_ms_per_token": 0.5}}).splitlines()[0].endswith("gpu_latency_ms_per_token |")


def test_paired_difference_cancels_the_spread_both_models_share():
    from stages.evaluate import difference

    g = torch.Generator().manual_seed(0)
    hard = torch.rand(400, generator=g, dtype=torch.float64) * 4  # windows differ a lot in difficulty
    worse = hard + 0.01 + 0.001 * torch.randn(400, generator=g, dtype=torch.float64)
    paired = difference(worse, hard)
    assert paired["val_loss_delta"] == pytest.approx(0.01, abs=2e-4)
    assert paired["val_loss_delta_ci95"] < 0.001, "the shared spread cancels: a 0.01 gap is clearly resolved"
    unpaired = difference(worse, hard[:399])  # different windows: the spread stays, so does the doubt
    assert unpaired["val_loss_delta_ci95"] > 0.1
    assert difference(hard, hard) == {"val_loss_delta": 0.0, "val_loss_delta_ci95": 0.0}


def test_bits_per_byte_by_hand():
    # 2 nats per token, 4 bytes per token: 2 / ln 2 / 4 bits per byte
    assert bits_per_byte(2.0, 0.25) == pytest.approx(2 / np.log(2) / 4)


def short_training(p, batch_size: int = 8, grad_accum: int = 1, compile: bool = False) -> dict:
    """Weights after 6 steps of the training loop's fit() on the tiny tokens."""
    from lm.lit import LitGPT
    from lm.train import fit, new_model

    cfg = type(p.pretrain.train)(
        max_steps=6,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_steps=1,
        log_every=2,
        accelerator="cpu",
        compile=compile,
    )
    model = new_model(p.pretrain.model, p.paths.tokens, seed=0)
    history = fit(LitGPT(model, cfg), cfg, p.paths.tokens, seed=3)["history"]
    assert [row["step"] for row in history] == [2, 4, 6], "one row per logged optimizer step"
    return model.state_dict()


def test_val_every_scores_the_same_val_windows_during_training(pipeline):
    from lm.lit import LitGPT
    from lm.train import fit, new_model

    p, _ = pipeline
    cfg = type(p.pretrain.train)(
        max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, log_every=3, val_every=2, val_batches=2, accelerator="cpu"
    )
    model, logged = new_model(p.pretrain.model, p.paths.tokens, seed=0), []
    result = fit(LitGPT(model, cfg), cfg, p.paths.tokens, seed=3, on_log=lambda row, step: logged.append((step, row)))
    curve = result["val_curve"]
    assert [(r["step"], r["tokens"]) for r in curve] == [(s, s * 4 * p.pretrain.model.block_size) for s in (2, 4, 6)]
    assert curve[-1]["val_loss"] == result["val_loss"] and curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert [step for step, row in logged if "val_loss" in row] == [2, 4], "MLflow's val_loss history (and fit's last)"


def test_train_tokens_repeats_a_prefix_of_the_train_split():
    from lm.data import train_tokens, training_windows

    tokens = np.arange(1000, dtype=np.uint16)
    assert train_tokens(tokens, 0, 8) is tokens
    subset = train_tokens(tokens, 100, 8)
    windows = training_windows(subset, 8, per_step=4, max_steps=50, world_size=1, seed=0)
    drawn = np.concatenate([windows[i][0].numpy() for i in range(len(windows))])
    assert drawn.max() < 100 and len(drawn) > 2 * 100, "200 windows of 8 from 100 tokens: several epochs"
    with pytest.raises(ConfigError, match=r"train_tokens: 5000 must be in \(8, 1000\]"):
        train_tokens(tokens, 5000, 8)


def test_gradient_accumulation_equals_the_whole_batch_at_once(pipeline):
    p, _ = pipeline
    whole, accumulated = short_training(p), short_training(p, batch_size=4, grad_accum=2)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=2e-5, rtol=1e-4)


def test_compiled_training_matches_eager(pipeline):
    p, _ = pipeline
    eager, compiled = short_training(p), short_training(p, compile=True)
    assert list(compiled) == list(eager), "compiling keeps the parameter names"
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, atol=1e-4, rtol=1e-3)


def test_cached_teacher_topk_distills_like_the_teacher_on_the_fly(pipeline, tmp_path):
    p, _ = pipeline
    from lm.distill import teacher_topk_cache

    teacher_dir = p.paths.model("pretrain")
    vocab = model_dir.load(teacher_dir).config.vocab_size
    students = {}
    for k in (0, vocab):  # the top-"vocab" logits are all of them: the same loss, up to their fp16 storage
        out = tmp_path / f"k{k}"
        models = models_beside(p, out / "models", "pretrain")
        paths = dataclasses.replace(p.paths, models=models, checkpoints=str(out / "ckpt"), plots=str(out / "plots"))
        cfg = dataclasses.replace(p.distill, teacher_topk=k, attention_weight=0.0)
        distill.run(dataclasses.replace(p, distill=cfg, paths=paths), NO_TRACKING)
        students[k] = model_dir.load(paths.model("distill")).state_dict()
    for name, tensor in students[0].items():
        torch.testing.assert_close(students[vocab][name], tensor, atol=2e-3, rtol=1e-2)
    root = tmp_path / f"k{vocab}" / "ckpt" / "distill" / "teacher-topk"
    cache = next(root.iterdir())
    built = (cache / "values.npy").stat().st_mtime_ns
    teacher, train = model_dir.load(teacher_dir), p.distill.train
    teacher_topk_cache(teacher, teacher_dir, p.paths.tokens, root, train, vocab, p.run.seed, 32)
    assert (cache / "values.npy").stat().st_mtime_ns == built, "a second run reuses the cache"
    teacher_topk_cache(teacher, teacher_dir, p.paths.tokens, root, train, 8, p.run.seed, 32)
    assert [d.name for d in cache.parent.iterdir()] != [cache.name], "a new key replaces the old cache"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_full_disk_stops_the_stage_in_one_line_and_keeps_the_previous_output(tmp_path):
    """Ingest writing onto a 1 MB tmpfs that fills up: one error line, exit 1, the previous output intact and no
    temporary folder left behind."""
    disk, corpus = tmp_path / "disk", tmp_path / "corpus"
    disk.mkdir()
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(base64.b64encode(os.urandom(300_000)).decode())  # compresses badly
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        previous = disk / "raw" / "part-00000.parquet"
        previous.parent.mkdir()
        previous.write_bytes(b"the previous output")
        params = {"ingest": {"sources": [{"path": str(corpus)}]}, "paths": {"raw": str(disk / "raw")}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        shutil.copy(ROOT / "dvc.yaml", tmp_path)
        proc = subprocess.run(
            [sys.executable, "-m", "stages.ingest"],
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if " ERROR: " in line]
        assert len(errors) == 1 and "ingest failed: no space left on the device" in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert previous.read_bytes() == b"the previous output"
        assert sorted(p.name for p in disk.iterdir()) == ["raw"], "no temporary folder left"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


KILLED_INSIDE = """
import os, signal, sys
from lm import io
with io.atomic_{kind}(sys.argv[1]) as tmp:
    (tmp / "part" if "{kind}" == "dir" else tmp).write_text("part-written")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temps_of_a_killed_writer_go_with_the_next_write_and_a_live_writers_stay(kind, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_INSIDE.replace("{kind}", kind), str(out)], cwd=ROOT)
    assert killed.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.") and not out.exists(), "the kill left a temp, no output"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"{io.temp_prefix(out).replace(str(os.getpid()), str(live.pid))}x.tmp").mkdir()
        with io.atomic_dir(out) if kind == "dir" else io.atomic_file(out) as tmp:
            (tmp / "whole" if kind == "dir" else tmp).write_text("whole")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["out", f".out.{os.uname().nodename}.{live.pid}.x.tmp"]), names
    finally:
        live.kill()


def test_a_replaced_directory_holds_only_the_new_files_and_nothing_is_left_beside_it(tmp_path):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with io.atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_gates_keep_a_failing_model_from_its_aliases_and_promote_a_passing_one(pipeline, tmp_path, monkeypatch):
    """The registry's role aliases and `champion` move only onto versions whose gates passed; gates_mode fail
    stops evaluate with one line naming the model, metric, threshold and value, warn only reports."""
    import mlflow

    from stages import evaluate
    from stages.config import Gate
    from stages.tracking import stage_run

    p, m = pipeline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with stage_run("quantize", "gates", {}, []) as run:  # the making stages' registration, as stages.cli does it
        for model in ("distill", "quantize_int8", "quantize_int4_gptq"):
            run.register_model(p.models()[model], "gates", model, p.model_tags(model))
    int8_bytes = m["evaluate"]["quantize_int8"]["file_bytes"]

    def evaluated(mode: str, int8_limit: float) -> dict:
        gates = {"int8": Gate(max_file_bytes=int8_limit), "int4": Gate(max_val_loss_increase=10.0), "student": Gate()}
        cfg = dataclasses.replace(p.evaluate, gates=gates, gates_mode=mode, champion="int4")
        params = dataclasses.replace(p, run=dataclasses.replace(p.run, experiment="gates"), evaluate=cfg)
        with stage_run("evaluate", "gates", {}, []) as run:
            return evaluate.run(params, run)

    client = mlflow.MlflowClient()
    version = {
        model: client.get_model_version_by_alias("gates", model).version for model in ("distill", "quantize_int8")
    }
    version["quantize_int4_gptq"] = client.get_model_version_by_alias("gates", "quantize_int4_gptq").version

    def alias(name: str) -> str | None:
        try:
            return client.get_model_version_by_alias("gates", name).version
        except mlflow.MlflowException:
            return None

    failed = rf"gate failed: quantize_int8: file_bytes {int8_bytes} > evaluate\.gates\.int8\.max_file_bytes "
    failed += rf"{int8_bytes - 1}$"
    with pytest.raises(evaluate.GateFailed, match=failed):
        evaluated("fail", int8_bytes - 1)
    assert alias("int8") is None, "a failed gate blocks the promotion"
    assert (
        alias("int4") == alias("champion") == version["quantize_int4_gptq"] and alias("student") == version["distill"]
    )
    assert "| quantize_int8 | max_file_bytes" in (Path(p.paths.reports) / "evaluate.md").read_text()

    results = evaluated("warn", int8_bytes - 1)
    assert results["quantize_int8"]["gates_passed"] == 0 and results["quantize_int4_gptq"]["gates_passed"] == 1
    assert alias("int8") is None
    evaluated("fail", int8_bytes)
    assert alias("int8") == version["quantize_int8"], "a passing gate promotes"


def test_gates_name_models_or_roles_and_judge_an_increase_only_where_there_is_a_source():
    with pytest.raises(ConfigError, match="'int3' is not a model or role"):
        parse_params({"evaluate": {"gates": {"int3": {"max_file_bytes": 1}}}})
    with pytest.raises(ConfigError, match="evaluate.gates.teacher.max_val_loss_increase: teacher is not made from"):
        parse_params({"evaluate": {"gates": {"teacher": {"max_val_loss_increase": 0.1}}}})
    with pytest.raises(ConfigError, match="evaluate.champion"):
        parse_params({"evaluate": {"champion": "nobody"}})
