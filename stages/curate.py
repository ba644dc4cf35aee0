"""curate: a datatrove pipeline: exact dedup, quality filters, language id, PII redaction, decontamination,
selection, MinHash near-dedup, then the train/val split with domain mixing weights.

Writes train/ and val/ Parquet shards (part-<task>-<n>.parquet); a report per step (documents changed, length
histograms, examples of what it removed); plots of documents per length bin before and after curation, and of
documents and bytes left after each step. Metrics: documents and bytes in and out of every step, train/val sizes.

Runs in passes (exact dedup needs every task's hashes before any task can filter; MinHash the same), each split
into `curate.tasks` tasks of which `curate.workers` run at once, on datatrove's executor of `curate.executor`:
local processes, a Ray cluster or a Slurm cluster. The work folder (`curate.work_dir`) is anything every task
reaches: this machine's disk, a shared file system or an fsspec URL.
"""

import contextlib
import inspect
import logging
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)

from lm import io
from lm.curation import (
    LENGTH_BINS,
    DocumentFilter,
    FastTextLID,
    Measured,
    NGramDecontaminator,
    PIIRedactor,
    RawShardReader,
    RegexWordTokenizer,
    Selector,
    ShardWriter,
    SplitAndMix,
    alpha_fraction,
    evaluation_texts,
    longest_line,
    merge_reports,
    normalized_text,
)
from stages import cli, cost
from stages.config import ConfigError, CurateConfig, FilterStep, NearDedupConfig, Params
from stages.tracking import Tracker

log = logging.getLogger("stages.curate")


def lsh_bands_rows(cfg: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows) as configured, or those whose S-curve 1 - (1 - s^rows)^bands best separates similarities
    below the threshold from those above (least false-positive + false-negative area, as datasketch chooses)."""
    if cfg.bands:
        return cfg.bands, cfg.rows
    s = np.linspace(0, 1, 1001)
    below, above = s <= cfg.threshold, s >= cfg.threshold

    def error(b: int, r: int) -> float:
        p = 1 - (1 - s**r) ** b
        return np.trapezoid(p[below], s[below]) + np.trapezoid(1 - p[above], s[above])

    candidates = [(b, r) for b in range(1, cfg.hashes + 1) for r in range(1, cfg.hashes // b + 1)]
    return min(candidates, key=lambda br: error(*br))


def datatrove_filter(cls, key: str, step: FilterStep, language) -> PipelineStep:
    """cls(**options), a bad option naming its key and what cls accepts."""
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("exclusion_writer", "language")]
    unknown = sorted(set(step.options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key curate.{key}.options.{unknown[0]}; allowed: {', '.join(allowed)}")
    return cls(**step.options, language=language)


def basic_filters(cfg: CurateConfig) -> list[tuple[str, DocumentFilter]]:
    """(name, filter) of the length, alphabetic share and longest line bounds."""
    return [
        ("min_chars", DocumentFilter("min chars", len, low=cfg.min_chars)),
        ("max_chars", DocumentFilter("max chars", len, high=cfg.max_chars)),
        ("min_alpha_fraction", DocumentFilter("min alpha fraction", alpha_fraction, low=cfg.min_alpha_fraction)),
        ("max_line_chars", DocumentFilter("max line chars", longest_line, high=cfg.max_line_chars)),
    ]


def filter_steps(cfg: CurateConfig, exact: str | None) -> list[tuple[str, PipelineStep]]:
    """(name, datatrove step) of the first filtering pass, in order; exact: the exact-dedup folder, if on."""
    words = word_splitter(cfg)
    steps = []
    if exact:
        steps.append(("exact_dedup", ExactDedupFilter(f"{exact}/dups", ExactDedupConfig(normalized_text))))
    steps += basic_filters(cfg)
    if cfg.language.enabled:
        if not Path(cfg.language.model_path).is_file():
            raise io.DataError(f"curate.language.model_path: {cfg.language.model_path} is not a file")
        lid = LanguageFilter(list(cfg.language.languages), cfg.language.threshold)
        lid.model = FastTextLID(list(cfg.language.languages), cfg.language.model_path)
        steps.append(("language", lid))
    quality = {
        "gopher_quality": GopherQualityFilter,
        "gopher_repetition": GopherRepetitionFilter,
        "c4": C4QualityFilter,
        "fineweb": FineWebQualityFilter,
    }
    steps += [
        (key, datatrove_filter(cls, key, getattr(cfg, key), words))
        for key, cls in quality.items()
        if getattr(cfg, key).enabled
    ]
    pii = cfg.pii
    if pii.enabled:
        steps.append(("pii", PIIRedactor(pii.emails, pii.ips, pii.public_ips_only, pii.phones, pii.secrets)))
    if cfg.decontaminate.enabled:
        eval_texts = evaluation_texts(cfg.decontaminate.eval_files)
        steps.append(("decontaminate", NGramDecontaminator(eval_texts, cfg.decontaminate.ngram)))
    if cfg.selection.scorer:
        s = cfg.selection
        steps.append(("selection", Selector(s.scorer, dict(s.options), s.min_score, s.max_score)))
    return steps


class Passes:
    """The datatrove passes of one curate run, each on the configured executor with its own logging folder under
    work. A pass that leaves a task unfinished stops the run with that task's error line. `seconds`: each pass's
    wall time, by name."""

    def __init__(self, work: str, cfg: CurateConfig, scratch: Path):
        self.work, self.cfg, self.scratch, self.count = work, cfg, scratch, 0
        self.run_id = uuid.uuid4().hex[:8]
        self.seconds: dict[str, float] = {}

    def run(self, name: str, pipeline: list, tasks: int | None = None) -> None:
        started = time.perf_counter()
        self.count += 1
        tasks = tasks or self.cfg.tasks
        logs = f"{self.work}/logs/pass-{self.count}"
        executor = self.executor(pipeline, tasks, logs)
        executor.run()
        if isinstance(executor, SlurmPipelineExecutor):
            wait_for_slurm_jobs(executor.job_name, self.cfg.slurm.poll_s)
        failed = executor.get_incomplete_ranks(range(tasks), skip_completed=True)
        if failed:
            raise io.DataError(
                f"curate: pass {self.count} on {self.cfg.executor}: {len(failed)} of {tasks} tasks did not finish; "
                f"task {failed[0]}: {task_error(logs, failed[0])}"
            )
        self.seconds[name] = round(time.perf_counter() - started, 1)

    def executor(self, pipeline: list, tasks: int, logs: str) -> PipelineExecutor:
        cfg, workers = self.cfg, min(self.cfg.workers, tasks)
        common = {"tasks": tasks, "workers": workers, "skip_completed": False, "logging_dir": logs}
        if cfg.executor == "local":
            return LocalPipelineExecutor(pipeline, **common)
        if cfg.executor == "ray":
            return RayPipelineExecutor(
                pipeline, cpus_per_task=cfg.ray.cpus_per_task, mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb, **common
            )
        slurm = cfg.slurm
        in_venv = sys.prefix != sys.base_prefix
        return SlurmPipelineExecutor(
            pipeline,
            time=f"{slurm.time_minutes // 60:02d}:{slurm.time_minutes % 60:02d}:00",
            partition=slurm.partition,
            cpus_per_task=slurm.cpus_per_task,
            mem_per_cpu_gb=slurm.mem_per_cpu_gb,
            job_name=f"curate-{self.run_id}-pass-{self.count}",
            qos="",  # the cluster's default; sbatch_args may name one
            venv_path=f"{sys.prefix}/bin/activate" if in_venv else None,
            # a failed pass cancels the stats job waiting on it, instead of leaving it queued for ever
            sbatch_args={"kill-on-invalid-dep": "yes", **slurm.sbatch_args},
            slurm_logs_folder=str(self.scratch / "slurm_logs" / f"pass-{self.count}"),
            **common,
        )

    def measured(self, name: str, step: PipelineStep) -> Measured:
        return Measured(step, name, f"{self.work}/steps/{name}", self.cfg.examples)


def wait_for_slurm_jobs(name: str, poll_s: float) -> None:
    """Until no job of this name (the pass's task array and datatrove's stats job) is queued or running."""
    while True:
        queued = subprocess.run(["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True)
        if queued.returncode:
            raise io.DataError(f"curate: squeue failed ({queued.returncode}): {queued.stderr.strip()}")
        if not queued.stdout.strip():
            return
        time.sleep(poll_s)


def task_error(logs: str, rank: int) -> str:
    """The last exception line of a task's datatrove log (else its last line)."""
    folder, name = get_datafolder(logs), f"logs/task_{rank:05d}.log"
    if not folder.exists(name):
        return "it never started (no log)"
    with folder.open(name, "rt") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (errors or lines or ["its log is empty"])[-1]


@contextlib.contextmanager
def ray_connection(cfg: CurateConfig) -> Iterator[None]:
    """Connected to the Ray cluster (for the ray executor), shipping this checkout's lm/ (every step the tasks run
    lives there or in datatrove) to its workers: they run the driver's code, not whatever version a node has."""
    if cfg.executor != "ray":
        yield
        return
    import ray

    import lm

    ray.init(address=cfg.ray.address or None, runtime_env={"py_modules": [lm]}, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def word_splitter(cfg: CurateConfig):
    return RegexWordTokenizer() if cfg.word_tokenizer == "regex" else "en"


def curate(cfg: CurateConfig, raw: str, out: str, work: str, scratch: Path) -> tuple[dict, dict]:
    """Run every pass from the raw shards into out/{train,val}; returns each step's merged report and each pass's
    seconds. Folders are paths or URLs that every task reaches; scratch is a folder on this machine."""
    passes = Passes(work, cfg, scratch)
    exact = f"{work}/exact" if cfg.exact_dedup else None
    if exact:
        config = ExactDedupConfig(normalized_text)
        passes.run("exact_signatures", [RawShardReader(raw), ExactDedupSignature(f"{exact}/sigs", config)])
        passes.run("exact_duplicates", [ExactFindDedups(f"{exact}/sigs", f"{exact}/dups", config)], tasks=1)
    steps = filter_steps(cfg, exact)
    filtered = f"{work}/filtered"
    passes.run("filters", [RawShardReader(raw), *(passes.measured(n, s) for n, s in steps), ShardWriter(filtered)])
    names = [name for name, _ in steps]
    last = [RawShardReader(filtered, own_shards=True)]
    if cfg.near_dedup.enabled:
        bands, rows = lsh_bands_rows(cfg.near_dedup)
        minhash = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=bands, hashes_per_bucket=rows)
        near = f"{work}/minhash"
        signatures = MinhashDedupSignature(f"{near}/sigs", minhash, word_splitter(cfg))
        passes.run("minhash_signatures", [RawShardReader(filtered, own_shards=True), signatures])
        buckets = MinhashDedupBuckets(f"{near}/sigs", f"{near}/buckets", config=minhash)
        passes.run("minhash_buckets", [buckets], tasks=bands)
        clusters = MinhashDedupCluster(f"{near}/buckets", f"{near}/remove", config=minhash)
        passes.run("minhash_clusters", [clusters], tasks=1)
        last.append(passes.measured("near_dedup", MinhashDedupFilter(f"{near}/remove")))
        names.append("near_dedup")
    mixing = SplitAndMix(cfg.val_fraction, dict(cfg.mixing_weights))
    passes.run("split_and_write", [*last, passes.measured("mixing", mixing), ShardWriter(out)])
    names.append("mixing")
    return {name: merge_reports(f"{work}/steps/{name}", cfg.examples) for name in names}, passes.seconds


@contextlib.contextmanager
def work_folder(cfg: CurateConfig, raw: Path, out: Path, scratch: Path) -> Iterator[tuple[str, str, str]]:
    """(raw, out, work) for the passes, as every task reaches them. By default scratch, reading raw and writing out
    in place; under a work_dir (a shared folder or an fsspec URL), a subfolder of its own, into which raw is copied
    first and from which the curated shards are copied into out at the end, removed either way."""
    if not cfg.work_dir:
        yield str(raw.resolve()), str(out.resolve()), str(scratch.resolve())
        return
    work = f"{cfg.work_dir.rstrip('/')}/curate-{uuid.uuid4().hex[:12]}"
    folder = get_datafolder(work)
    try:
        for shard in sorted(raw.glob("part-*.parquet")):
            folder.put_file(str(shard), f"raw/{shard.name}")
        yield f"{work}/raw", f"{work}/curated", work
        for name in folder.list_files("curated"):
            destination = out / Path(name).relative_to("curated")
            destination.parent.mkdir(parents=True, exist_ok=True)
            folder.get_file(name, str(destination))
    finally:
        with contextlib.suppress(FileNotFoundError):
            folder.rm("", recursive=True)


def length_histogram(before: list[int], after: list[int]) -> list[dict]:
    """Documents per length bin, bins doubling from 16 characters (each row counts the documents of at most `chars`
    characters and more than half that): what DVC plots draws."""
    top = max((i for i in range(LENGTH_BINS) if before[i] or after[i]), default=0)
    return [{"chars": 2 ** (i + 4), "before": before[i], "after": after[i]} for i in range(top + 1)]


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.curate, params.paths
    curated = Path(paths.curated)
    curated.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=curated.parent, prefix=io.temp_prefix(curated), suffix=".tmp") as scratch,
        io.atomic_dir(curated) as out,
    ):
        with work_folder(cfg, Path(paths.raw), out, Path(scratch)) as (raw, into, work), ray_connection(cfg):
            reports, seconds = curate(cfg, raw, into, work, Path(scratch))
        first, last = next(iter(reports.values())), reports["mixing"]
        if last["in"]["documents"] == 0:
            steps = {name: r["out"]["documents"] for name, r in reports.items()}
            raise io.DataError(
                f"curate: no document of {first['in']['documents']} in {paths.raw} survived the filters: {steps}"
            )
        train, val = split_sizes(out)
        if not train["documents"] or not val["documents"]:
            empty = "val" if not val["documents"] else "train"
            raise io.DataError(
                f"curate: the {empty} split is empty ({last['in']['documents']} documents, "
                f"val_fraction {cfg.val_fraction})"
            )
    steps = {name: {"in": r["in"], "out": r["out"]} for name, r in reports.items()}
    io.write_json(
        Path(paths.reports) / "curate.json",
        {
            name: {
                "changed": r["changed"],
                "removed_examples": r["removed_examples"],
                "lengths_in": r["lengths_in"],
                "lengths_out": r["lengths_out"],
            }
            for name, r in reports.items()
        },
    )
    with io.atomic_file(Path(paths.plots) / "curate_lengths.csv") as tmp:
        pd.DataFrame(length_histogram(first["lengths_in"], last["lengths_in"])).to_csv(tmp, index=False)
    with io.atomic_file(Path(paths.plots) / "curate_steps.csv") as tmp:
        rows = [{"step": "input", **first["in"]}] + [{"step": n, **r["out"]} for n, r in reports.items()]
        pd.DataFrame(rows).to_csv(tmp, index=False)
    metrics = {"input": first["in"], "steps": steps, "train": train, "val": val, cost.PHASES: seconds}
    if cfg.near_dedup.enabled:
        bands, rows = lsh_bands_rows(cfg.near_dedup)
        metrics["near_dedup"] = {"bands": bands, "rows": rows, "s_curve_midpoint": (1 / bands) ** (1 / rows)}
    return metrics


def split_sizes(out: Path) -> tuple[dict, dict]:
    def one(split: str) -> dict:
        docs = nbytes = 0
        for shard in sorted((out / split).glob("*.parquet")):
            text = pq.read_table(shard, columns=["text"])["text"]
            docs += len(text)
            nbytes += pc.sum(pc.binary_length(text.cast("binary"))).as_py() or 0
        return {"documents": docs, "bytes": nbytes}

    return one("train"), one("val")


if __name__ == "__main__":
    cli.main(run)
