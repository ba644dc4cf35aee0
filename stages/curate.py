"""curate: a datatrove pipeline: exact dedup, quality filters, language id, PII redaction, decontamination,
selection, MinHash near-dedup, then the train/val split with domain mixing weights.

Writes train/ and val/ Parquet shards (part-<task>-<n>.parquet); a report per step (documents changed, length
histograms, examples of what it removed); plots of documents per length bin before and after curation, and of
documents and bytes left after each step. Metrics: documents and bytes in and out of every step, train/val sizes.

Runs on datatrove's LocalPipelineExecutor in passes (exact dedup needs every task's hashes before any task can
filter; MinHash the same), each pass split into `curate.tasks` tasks of which `curate.workers` run at once.
"""

import inspect
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.executor import LocalPipelineExecutor
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
from datatrove.utils.lid import FT176LID

from lm import io
from lm.curation import (
    LENGTH_BINS,
    DocumentFilter,
    Measured,
    NGramDecontaminator,
    PIIRedactor,
    RawShardReader,
    RegexWordTokenizer,
    Selector,
    ShardWriter,
    SplitAndMix,
    evaluation_texts,
    merge_reports,
    normalized_text,
)
from stages import cli
from stages.config import ConfigError, CurateConfig, FilterStep, NearDedupConfig, Params
from stages.tracking import Tracker

log = logging.getLogger("stages.curate")


def alpha_fraction(text: str) -> float:
    return sum(map(str.isalpha, text)) / max(len(text), 1)


def longest_line(text: str) -> int:
    return max(map(len, text.split("\n")))


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


class FastTextLID(FT176LID):
    """datatrove's fastText language id, loading a local model instead of downloading lid.176."""

    def __init__(self, languages: list[str], model_path: str):
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


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
    """The datatrove passes of one curate run, each on a LocalPipelineExecutor with its own logging folder."""

    def __init__(self, work: Path, cfg: CurateConfig):
        self.work, self.cfg, self.count = work, cfg, 0

    def run(self, pipeline: list, tasks: int | None = None) -> None:
        self.count += 1
        tasks = tasks or self.cfg.tasks
        executor = LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(self.cfg.workers, tasks),
            skip_completed=False,
            logging_dir=str(self.work / "logs" / f"pass-{self.count}"),
        )
        executor.run()

    def measured(self, name: str, step: PipelineStep) -> Measured:
        return Measured(step, name, str(self.work / "steps" / name), self.cfg.examples)


def word_splitter(cfg: CurateConfig):
    return RegexWordTokenizer() if cfg.word_tokenizer == "regex" else "en"


def curate(cfg: CurateConfig, raw: str | Path, out: Path, work: Path) -> dict:
    """Run every pass from the raw shards into out/{train,val}; returns each step's merged report.
    Folders are strings: what datatrove's steps take."""
    passes = Passes(work, cfg)
    exact = f"{work}/exact" if cfg.exact_dedup else None
    if exact:
        config = ExactDedupConfig(normalized_text)
        passes.run([RawShardReader(str(raw)), ExactDedupSignature(f"{exact}/sigs", config)])
        passes.run([ExactFindDedups(f"{exact}/sigs", f"{exact}/dups", config)], tasks=1)
    steps = filter_steps(cfg, exact)
    filtered = f"{work}/filtered"
    passes.run([RawShardReader(str(raw)), *(passes.measured(n, s) for n, s in steps), ShardWriter(filtered)])
    names = [name for name, _ in steps]
    last = [RawShardReader(filtered, own_shards=True)]
    if cfg.near_dedup.enabled:
        bands, rows = lsh_bands_rows(cfg.near_dedup)
        minhash = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=bands, hashes_per_bucket=rows)
        near = f"{work}/minhash"
        signatures = MinhashDedupSignature(f"{near}/sigs", minhash, word_splitter(cfg))
        passes.run([RawShardReader(filtered, own_shards=True), signatures])
        passes.run([MinhashDedupBuckets(f"{near}/sigs", f"{near}/buckets", config=minhash)], tasks=bands)
        passes.run([MinhashDedupCluster(f"{near}/buckets", f"{near}/remove", config=minhash)], tasks=1)
        last.append(passes.measured("near_dedup", MinhashDedupFilter(f"{near}/remove")))
        names.append("near_dedup")
    mixing = SplitAndMix(cfg.val_fraction, dict(cfg.mixing_weights))
    passes.run([*last, passes.measured("mixing", mixing), ShardWriter(str(out))])
    names.append("mixing")
    return {name: merge_reports(work / "steps" / name, cfg.examples) for name in names}


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
        tempfile.TemporaryDirectory(dir=curated.parent, prefix=io.temp_prefix(curated), suffix=".tmp") as work,
        io.atomic_dir(curated) as out,
    ):
        reports = curate(cfg, paths.raw, out, Path(work))
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
    metrics = {"input": first["in"], "steps": steps, "train": train, "val": val}
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
