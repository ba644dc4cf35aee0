"""curate: exact dedup, length and quality filters, a deterministic train/val split.

Inputs:  ${paths.raw}
Outputs: ${paths.curated}/{train,val}/part-*.parquet; ${paths.reports}/curate.json (examples of what each step removed)
Plots:   ${paths.plots}/curate_lengths.csv: documents per length bin before and after curation
Metrics: ${paths.metrics}/curate.json: documents and bytes in and out of every step, train/val sizes
"""

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stages import io, tables
from stages.cli import stage_main
from stages.config import CurateConfig, Paths

log = logging.getLogger("stages.curate")


def normalized_key(text: str) -> str:
    """Exact-dedup key: the text with whitespace runs collapsed and case folded."""
    return hashlib.sha256(" ".join(text.split()).casefold().encode()).hexdigest()


def alpha_fraction(text: str) -> float:
    return sum(c.isalpha() for c in text) / max(len(text), 1)


def longest_line(text: str) -> int:
    return max(map(len, text.split("\n")))


def filter_steps(cfg: CurateConfig) -> list[tuple[str, Callable[[pd.DataFrame], pd.Series]]]:
    """(name, keep-mask) in the order they apply."""
    steps = []
    if cfg.exact_dedup:
        steps.append(("exact_dedup", lambda df: ~df["text"].map(normalized_key).duplicated()))
    lengths = lambda df: df["text"].str.len()  # noqa: E731
    steps += [
        ("min_chars", lambda df: lengths(df) >= cfg.min_chars),
        ("max_chars", lambda df: lengths(df) <= cfg.max_chars),
        ("min_alpha_fraction", lambda df: df["text"].map(alpha_fraction) >= cfg.min_alpha_fraction),
        ("max_line_chars", lambda df: df["text"].map(longest_line) <= cfg.max_line_chars),
    ]
    return steps


def _size(df: pd.DataFrame) -> dict:
    return {"documents": len(df), "bytes": int(df["text"].str.encode("utf-8").str.len().sum()) if len(df) else 0}


def length_histogram(before: pd.DataFrame, after: pd.DataFrame) -> list[dict]:
    """Documents per length bin before and after curation, bins doubling from 16 characters (each row counts
    the documents of at most `chars` characters and more than half that): what DVC plots draws."""

    def log2_bins(df: pd.DataFrame) -> pd.Series:
        lengths = df["text"].str.len().clip(lower=1).to_numpy()
        return pd.Series(np.clip(np.ceil(np.log2(lengths)), 4, 30).astype(int)).value_counts()

    counts = {"before": log2_bins(before), "after": log2_bins(after)}
    top = max(int(c.index.max()) for c in counts.values())
    return [{"chars": 2**k, **{name: int(c.get(k, 0)) for name, c in counts.items()}} for k in range(4, top + 1)]


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Split by a hash of the id: stable across runs and independent of document order."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def curate(df: pd.DataFrame, cfg: CurateConfig) -> tuple[pd.DataFrame, dict, dict]:
    """Apply every step; returns the kept documents, per-step metrics and removed examples."""
    steps, examples = {}, {}
    for name, keep_mask in filter_steps(cfg):
        keep = keep_mask(df)
        removed = df[~keep]
        steps[name] = {"in": _size(df), "out": _size(df[keep])}
        examples[name] = [{"location": r.location, "text": r.text[:300]} for r in removed.head(3).itertuples()]
        df = df[keep]
        log.info("curate: %-20s kept %d of %d documents", name, len(df), steps[name]["in"]["documents"])
    return df.reset_index(drop=True), steps, examples


def run(cfg: CurateConfig, paths: Paths) -> dict:
    raw = tables.read_shards(paths.raw, tables.RAW_DOCS)
    kept, steps, examples = curate(raw, cfg)
    if kept.empty:
        raise io.DataError(f"curate: no document of {len(raw)} in {paths.raw} survived the filters: {steps}")
    val_mask = kept["id"].map(lambda i: is_val(i, cfg.val_fraction))
    splits = {"train": kept[~val_mask], "val": kept[val_mask]}
    if splits["val"].empty or splits["train"].empty:
        empty = "val" if splits["val"].empty else "train"
        raise io.DataError(
            f"curate: the {empty} split is empty ({len(kept)} documents, val_fraction {cfg.val_fraction})"
        )
    with io.atomic_dir(paths.curated) as out:
        for name, df in splits.items():
            tables.write_shards(df.reset_index(drop=True), out / name, tables.CURATED_DOCS, shard_rows=50_000)
    io.write_json(Path(paths.reports) / "curate.json", {"steps": steps, "removed_examples": examples})
    with io.atomic_file(Path(paths.plots) / "curate_lengths.csv") as tmp:
        pd.DataFrame(length_histogram(raw, kept)).to_csv(tmp, index=False)
    return {"input": _size(raw), "steps": steps, "train": _size(splits["train"]), "val": _size(splits["val"])}


def main() -> None:
    stage_main(
        "curate",
        lambda p, tracker: run(p.curate, p.paths),
        inputs=lambda p: [p.raw],
        artifacts=lambda p: [f"{p.reports}/curate.json", f"{p.plots}/curate_lengths.csv"],
    )


if __name__ == "__main__":
    main()
