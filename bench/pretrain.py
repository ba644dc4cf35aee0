"""What a user waits for: `python -m stages pretrain` (dvc.yaml's command) as a whole process (default params, real
tokens, MLflow tracking and checkpoints on) against bench/ref_gpt.py (a plain PyTorch loop, nanoGPT's batches) as a
whole process, for the same steps, shape and tokens.

    python bench/pretrain.py [--steps 300 --tokens data/tokens]   # after `dvc repro tokenize`

Both run here, one after the other, each from interpreter start to exit (imports, tracking and saving count).
Ends with one JSON line: each side's wall seconds and tokens/s over the whole process, the in-loop tokens/s,
our MFU against this machine's measured fp32 GEMM peak, ratio (ours / reference tokens/s, whole process) and
bar_met (ratio >= bar).
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm import io  # noqa: E402
from lm.flops import cpu_peak_flops  # noqa: E402
from lm.tokens import load_tokens  # noqa: E402
from lm.train import resolve_shape  # noqa: E402
from stages.config import load_params  # noqa: E402

WARMUP = 5  # ref_gpt.py's untimed first steps: they count in its whole-process time
ENV = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def reference_tokens(tokens: Path):
    """Our token shards joined into nanoGPT's layout (one train.bin, one val.bin), which the references read, in a
    temporary folder."""
    if not (tokens / "meta.json").exists():
        raise SystemExit(f"{tokens}: no token files; make them first: dvc repro tokenize")
    with tempfile.TemporaryDirectory() as folder:
        for split in ("train", "val"):
            load_tokens(tokens, split)[:].tofile(Path(folder) / f"{split}.bin")
        yield folder


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def workspace(folder: Path, tokens: Path, steps: int, models: dict[str, Path] | None = None) -> None:
    """A tracked workspace (below) with the repo's params, the tokens (and `models`) read in place, the step count
    set."""
    tracked_workspace(folder, bench_params(folder, tokens, steps, models))


def bench_params(folder: Path, tokens: Path, steps: int, models: dict[str, Path] | None = None) -> dict:
    """The repo's params.yaml with the tokens read in place and the step count set; `models` (stage -> model
    directory) are linked into the folder's models folder."""
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree["paths"]["tokens"] = str(tokens)
    for stage, model in (models or {}).items():
        (folder / tree["paths"]["models"]).mkdir(parents=True, exist_ok=True)
        (folder / tree["paths"]["models"] / stage).symlink_to(model)
    tree["train"]["max_steps"] = steps
    tree["train"]["warmup_steps"] = min(tree["train"]["warmup_steps"], steps)
    return tree


def tracked_workspace(folder: Path, tree: dict) -> None:
    """A folder where `python -m stages <stage>` runs as in a user's repo after its first run: these params, the
    repo's dvc.yaml, a git repo and an MLflow store already made."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", folder)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    store = "import mlflow; from stages.tracking import tracking_uri; mlflow.MlflowClient(tracking_uri())"
    store += ".search_experiments()"
    subprocess.run([sys.executable, "-c", store], cwd=folder, env=ENV, check=True, capture_output=True)


def race(stage: str, ref_cmd: list[str], folder: Path, tokens_run: int) -> dict:
    """The reference's whole process, then our stage's, in `folder`: each side's wall seconds and tokens/s over the
    process and in the loop, our MFU, ratio (ours / reference tokens/s over the process)."""
    ref_seconds, ref_out = timed(ref_cmd, folder)
    our_seconds, _ = timed([sys.executable, "-m", "stages", stage], folder)
    metrics = io.read_json(folder / "metrics" / f"{stage}.json")
    ours, reference = tokens_run / our_seconds, tokens_run / ref_seconds
    return {
        "ours_wall_s": round(our_seconds, 1),
        "reference_wall_s": round(ref_seconds, 1),
        "ours_tokens_per_s": round(ours),
        "reference_tokens_per_s": round(reference),
        "ours_loop_tokens_per_s": round(metrics["tokens_per_s"]),
        "reference_loop_tokens_per_s": json.loads(ref_out.strip().splitlines()[-1])["tokens_per_s"],
        "ours_mfu": round(metrics["mfu"], 3),
        "ratio": round(ours / reference, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=load_params(ROOT / "params.yaml").pretrain.train.max_steps)
    p.add_argument("--tokens", default=str(ROOT / "data" / "tokens"))
    p.add_argument("--bar", type=float, default=0.9)
    a = p.parse_args()
    tokens = Path(a.tokens).resolve()
    params = load_params(ROOT / "params.yaml")
    shape, train = params.pretrain.model, params.pretrain.train
    vocab = resolve_shape(shape, tokens).vocab_size  # as the stage sizes it
    tokens_run = a.steps * train.batch_size * shape.block_size
    with tempfile.TemporaryDirectory() as tmp, reference_tokens(tokens) as flat:
        folder = Path(tmp)
        workspace(folder, tokens, a.steps)
        ref_cmd = [sys.executable, str(ROOT / "bench" / "ref_gpt.py"), f"--data={flat}", "--compile=0"]
        ref_cmd += [f"--layers={shape.n_layer}", f"--dim={shape.n_embd}", f"--heads={shape.n_head}"]
        ref_cmd += [f"--ctx={shape.block_size}", f"--vocab={vocab}", f"--batch={train.batch_size}"]
        ref_cmd += [f"--steps={a.steps - WARMUP}"]
        figures = race("pretrain", ref_cmd, folder, tokens_run)
    figures["cpu_peak_gflops"] = round(cpu_peak_flops() / 1e9, 1)
    print(
        json.dumps(
            {"bench": "pretrain", **figures, "bar": a.bar, "bar_met": figures["ratio"] >= a.bar, "steps": a.steps}
        )
    )


if __name__ == "__main__":
    main()
