"""Parquet tables between stages, checked against pandera schemas where each stage writes and reads them."""

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq

from lm.io import DataError, atomic_file

# the content hash: exact duplicates share it (curate's exact dedup drops them; a split keeps them together)
_ID = pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{16}$"))
_TEXT = pa.Column(str, pa.Check.str_length(min_value=1))
RAW_COLUMNS = ["id", "text", "source", "domain", "location"]

RAW_DOCS = pa.DataFrameSchema(
    {"id": _ID, "text": _TEXT, "source": pa.Column(str), "domain": pa.Column(str), "location": pa.Column(str)},
    strict=True,
    name="raw documents",
)
CURATED_DOCS = copy.deepcopy(RAW_DOCS).set_name("curated documents")  # set_name renames in place

# per-window val losses (training stages, evaluate): models scored on the same windows pair window by window,
# across runs too
WINDOW_LOSSES = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "window": pa.Column(int, pa.Check.ge(0)),
        "val_loss": pa.Column(float, pa.Check.ge(0)),
        "domain": pa.Column(str),
    },
    strict=True,
    name="window losses",
)


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, where: str | Path) -> pd.DataFrame:
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        cases = e.failure_cases.head(5).to_dict("records")
        raise DataError(f"{where}: does not match the {schema.name} schema: {cases}") from None


def write_shard(df: pd.DataFrame, path: Path | BinaryIO, schema: pa.DataFrameSchema, where: str = "") -> None:
    """Validate `df`, then write it as one zstd Parquet file (to a path, or an open file named by `where`)."""
    validate(df, schema, where or path)
    pq.write_table(pa_arrow.Table.from_pandas(df, preserve_index=False), path, compression="zstd")


def write_window_losses(losses: dict[str, np.ndarray], domains: dict[str, list[str]], path: Path) -> None:
    """Each model's val loss per window, in window order, with each window's domain, as one WINDOW_LOSSES file
    written in one step."""
    df = pd.concat(
        pd.DataFrame(
            {
                "model": name,
                "window": np.arange(len(loss)),
                "val_loss": np.asarray(loss, dtype=np.float64),
                "domain": domains[name],
            }
        )
        for name, loss in losses.items()
    )
    with atomic_file(path) as tmp:
        write_shard(df, tmp, WINDOW_LOSSES, where=str(path))


def write_shards(df: pd.DataFrame, out_dir: Path, schema: pa.DataFrameSchema, shard_rows: int) -> None:
    """Write `df` as part-00000.parquet, part-00001.parquet, ... of at most shard_rows rows into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, max(len(df), 1), shard_rows)):
        write_shard(df.iloc[start : start + shard_rows], out_dir / f"part-{i:05d}.parquet", schema)


def iter_shards(
    in_dir: str | Path, schema: pa.DataFrameSchema, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """Every part-*.parquet under in_dir in order, one at a time (so a corpus is never held whole), each checked
    against `schema` (only the requested columns, when given)."""
    for shard in list_shards(in_dir):
        yield read_shard(shard, schema, columns)


def list_shards(in_dir: str | Path) -> list[Path]:
    """The part-*.parquet files under in_dir, in order; none is an error."""
    shards = sorted(Path(in_dir).glob("part-*.parquet"))
    if not shards:
        raise DataError(f"{in_dir}: no Parquet shards (part-*.parquet); did the upstream stage run?")
    return shards


def read_shard(
    shard: Path | BinaryIO, schema: pa.DataFrameSchema, columns: list[str] | None = None, where: str = ""
) -> pd.DataFrame:
    """One Parquet file (a path, or an open file named by `where`), checked against `schema` (only the requested
    columns, when given)."""
    where = where or shard
    try:
        df = pq.read_table(shard, columns=columns).to_pandas()
    except pa_arrow.ArrowException as e:
        raise DataError(f"{where}: unreadable Parquet: {e}") from None
    return validate(df, schema.select_columns(columns).set_name(schema.name) if columns else schema, where)


def read_shards(in_dir: str | Path, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Every part-*.parquet under in_dir as one table, checked against `schema`."""
    return pd.concat(iter_shards(in_dir, schema), ignore_index=True)
