"""lm-evaluation-harness on our models, with the local tasks in lm/harness_tasks."""

from pathlib import Path

import lm_eval.models  # noqa: F401 - and the harness's own (hf)
import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

import lm.harness  # noqa: F401 - registers the `llm-pipeline` model type

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["pipeline_python_idioms", "pipeline_python_snippets"]


def harness(model: str, model_args: str) -> dict:
    tasks = TaskManager(include_path=str(ROOT / "lm" / "harness_tasks"))
    results = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=tasks, device="cpu")
    return results["results"]


def test_our_adapter_scores_exactly_as_the_harness_scores_the_transformers_export(pipeline, monkeypatch):
    """Same acc and bits per byte through `--model llm-pipeline` on the model directory as through the
    harness's own `hf` model on its transformers export: the adapter's loglikelihoods are the harness's."""
    params, _ = pipeline
    monkeypatch.chdir(ROOT)  # the tasks' data paths are relative to the repo root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ours = harness("llm-pipeline", f"pretrained={params.paths.model('pretrain')}")
    reference = harness("hf", f"pretrained={params.paths.model('pretrain')}/hf")
    idioms, snippets = (ours[t] for t in TASKS)
    assert 0 <= idioms["acc,none"] <= 1 and snippets["bits_per_byte,none"] > 0
    assert idioms["acc,none"] == reference[TASKS[0]]["acc,none"]
    assert snippets["bits_per_byte,none"] == pytest.approx(reference[TASKS[1]]["bits_per_byte,none"], rel=1e-4)


def test_adapter_runs_a_quantized_variant_transformers_cannot_load(pipeline, monkeypatch):
    params, _ = pipeline
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = harness("llm-pipeline", f"pretrained={params.paths.model('quantize')}/int4_gptq")
    assert results[TASKS[1]]["bits_per_byte,none"] > 0
