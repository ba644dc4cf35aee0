"""ingest: stream the configured sources into Parquet documents.

Reads ingest.sources: `builtin:python`, local files, folders and globs, or fsspec URLs (s3://, gs://, https://,
file://, memory://, ...); text (.txt, .md, ...), JSON Lines (plain, .gz, .zst), Parquet, CSV. Writes Parquet
shards of documents (id = content hash, text, source, domain, location = file[:line|:row]), zstd, each closed at
ingest.shard_bytes of text or ingest.shard_rows documents. Metrics: documents, bytes, files per source; what was
skipped and why.

Nothing is held whole: text files are read one at a time (at most ingest.max_bytes_per_file), JSON Lines line
by line (at most ingest.max_line_bytes each), Parquet by record batch, CSV by block. Bad input stops the stage
with the file, line or row and what is wrong (ingest.on_error: raise), or is skipped and counted (skip).
"""

import codecs
import csv
import dataclasses
import gzip
import hashlib
import io as stdio
import itertools
import json
import logging
import re
import sys
import sysconfig
import time
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import infer_compression

from lm import io, tables
from lm.sources import BUILTIN_SOURCES, list_files, version_of
from lm.workers import Workers
from stages import cli, cost
from stages.config import IngestConfig, Params, Source
from stages.tracking import Tracker

log = logging.getLogger("stages.ingest")

# Tests and vendored trees hold fixtures (bad encodings, generated data) rather than the library's own text.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {0x7F: None}
_BINARY_PROBE = 8192  # bytes looked at for NULs, the mark of a binary file
_DETECT_SAMPLE = 1 << 20  # bytes a streamed file's encoding is detected on


class BadInput(io.DataError):
    """One file, line or row that cannot be read; under on_error: skip it is counted and passed over. Its message
    is one line, whatever a library's error text holds."""

    def __init__(self, message: str):
        super().__init__("; ".join(line.strip() for line in message.splitlines() if line.strip()))


def normalize(text: str) -> str:
    """Strip a BOM, turn CRLF/CR into LF, compose to NFC, drop NUL and other control characters."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).translate(_CONTROL)


def doc_id(text: str) -> str:
    """The content hash: the same text has the same id wherever and whenever it is ingested."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_format(path: str, source: Source) -> str:
    if source.format != "auto":
        return source.format
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return {".parquet": "parquet", ".csv": "csv"}.get(Path(name).suffix, "text")


def best_encoding(data: bytes, where: str):
    """charset-normalizer's best match for these bytes (decodes as str(), names its codec as .encoding)."""
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise BadInput(f"{where}: no text encoding fits these bytes (binary?)")
    return best


BOMS = (  # longest first: UTF-32 LE's BOM begins with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def bom_encoding(head: bytes) -> str | None:
    """The codec a byte-order mark at the start states exactly (it wins over the source's `encoding`), if any."""
    return next((codec for bom, codec in BOMS if head.startswith(bom)), None)


def peek(f, size: int = 4) -> bytes:
    """The first bytes of a file just opened, left unread."""
    if hasattr(f, "peek"):  # a buffered stream (zstd, remote, gzip): it need not seek back
        return f.peek(size)[:size]
    head = f.read(size)
    f.seek(0)
    return head


def is_wide(encoding: str) -> bool:
    """UTF-16 and UTF-32 text holds NUL bytes: they do not mean a binary file."""
    return encoding != "detect" and codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def decode(data: bytes, encoding: str, where: str) -> str:
    """Bytes -> str by the source's encoding policy: a codec name (strict), or "detect"."""
    if encoding == "detect":
        return str(best_encoding(data, where))
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadInput(f"{where}: line {line}: not {encoding} ({e.reason} at byte {e.start})") from None


def read_text(f, path: str, source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    """The whole file is one document."""
    data = f.read(cfg.max_bytes_per_file + 1)
    if len(data) > cfg.max_bytes_per_file:
        raise BadInput(f"{path}: larger than ingest.max_bytes_per_file ({cfg.max_bytes_per_file} bytes)")
    if not data:
        raise BadInput(f"{path}: empty file")
    encoding = bom_encoding(data) or source.encoding
    if encoding != "detect" and not is_wide(encoding) and (nul := data.find(b"\0", 0, _BINARY_PROBE)) >= 0:
        line = data[:nul].count(b"\n") + 1
        raise BadInput(f"{path}: line {line}: NUL byte: a binary file, not text")
    yield from split_documents(decode(data, encoding, path), path, source)


SEPARATORS = {"blank_lines": (re.compile(r"\n(?:[ \t]*\n)+"), "\n\n"), "lines": (re.compile(r"\n"), "\n")}


def split_documents(text: str, path: str, source: Source) -> Iterator[tuple[str, str]]:
    """A text file's documents by `source.documents`: the whole file, or its paragraphs or lines grouped in order
    up to `source.document_chars`, each located by its first line."""
    if source.documents == "file":
        yield path, text
        return
    separator, joiner = SEPARATORS[source.documents]
    group: list[str] = []
    first = size = 0
    line, start = 1, 0
    for match in itertools.chain(separator.finditer(text), [None]):
        end, after = (match.start(), match.end()) if match else (len(text), len(text))
        chunk = text[start:end]
        if (unit := chunk.strip("\n")).strip():
            if group and size + len(joiner) + len(unit) > source.document_chars:
                yield f"{path}:line {first}", joiner.join(group)
                group = []
            if not group:
                first, size = line + len(chunk) - len(chunk.lstrip("\n")), -len(joiner)
            group.append(unit)
            size += len(joiner) + len(unit)
        line += text.count("\n", start, after)
        start = after
    if group:
        yield f"{path}:line {first}", joiner.join(group)


def read_jsonl(f, path: str, source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    """One document per line, from its `text_column` field; a bad line is its own error (skippable)."""
    empty, encoding = True, source.encoding
    if (stated := bom_encoding(peek(f))) in ("utf-16", "utf-32"):  # lines of UTF-8 from here on
        f, encoding = codecs.EncodedFile(f, "utf-8", stated), "utf-8"
    elif stated:
        encoding = stated  # utf-8-sig: the first line's BOM goes
    for number in itertools.count(1):
        line = f.readline(cfg.max_line_bytes + 1)
        if not line:
            break
        empty = False
        where = f"{path}:{number}"
        if len(line) > cfg.max_line_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(cfg.max_line_bytes)) and not rest.endswith(b"\n"):
                pass  # the rest of the overlong line, in bounded pieces
            yield BadInput(f"{where}: line longer than ingest.max_line_bytes ({cfg.max_line_bytes})")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(decode(line, encoding, where))
        except BadInput as e:
            yield e
            continue
        except json.JSONDecodeError as e:
            yield BadInput(f"{where}: not JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(record, dict) or source.text_column not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            yield BadInput(f"{where}: no {source.text_column!r} field (has: {keys})")
            continue
        if not isinstance(text := record[source.text_column], str):
            yield BadInput(f"{where}: {source.text_column!r} is {type(text).__name__}, not a string")
            continue
        try:
            text.encode()
        except UnicodeEncodeError as e:  # valid JSON ("\ud800"), but no Unicode text
            yield BadInput(f"{where}: {source.text_column!r} holds a lone surrogate at character {e.start}")
            continue
        yield where, text
    if empty:
        raise BadInput(f"{path}: empty file")


def read_parquet(f, path: str, source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    try:
        parquet = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"{path}: not a readable Parquet file: {e}") from None
    if source.text_column not in parquet.schema_arrow.names:
        raise BadInput(f"{path}: no {source.text_column!r} column (has: {', '.join(parquet.schema_arrow.names)})")
    first_row = 0
    for group in range(parquet.num_row_groups):  # a damaged row group is its own error (skippable)
        try:
            texts = parquet.read_row_group(group, columns=[source.text_column]).column(0).to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            yield BadInput(f"{path}: row group {group} (rows {first_row + 1}-): unreadable Parquet: {e}")
        else:
            for row, text in enumerate(texts, first_row + 1):
                if isinstance(text, str):
                    yield f"{path}:row {row}", text
        first_row += parquet.metadata.row_group(group).num_rows


def detect_encoding(f, path: str) -> str:
    """The codec of a streamed file, detected on its first MB (whole lines), then rewound."""
    sample = f.read(_DETECT_SAMPLE)
    f.seek(0)
    if len(sample) == _DETECT_SAMPLE and b"\n" in sample:
        sample = sample[: sample.rindex(b"\n") + 1]
    return best_encoding(sample, path).encoding


def read_csv(f, path: str, source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    encoding = bom_encoding(peek(f)) or (detect_encoding(f, path) if source.encoding == "detect" else source.encoding)
    lines = codecs.getreader(encoding)(f, errors="strict")
    csv.field_size_limit(cfg.max_line_bytes)
    reader = csv.DictReader(lines)
    try:
        if reader.fieldnames is None:
            raise BadInput(f"{path}: empty file")
        if source.text_column not in reader.fieldnames:
            raise BadInput(f"{path}: no {source.text_column!r} column (has: {', '.join(reader.fieldnames)})")
        for row in reader:
            yield f"{path}:row {reader.line_num - 1}", row[source.text_column] or ""
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: row {reader.line_num}: not {encoding} ({e.reason})") from None
    except csv.Error as e:
        raise BadInput(f"{path}: row {reader.line_num}: {e}") from None


READERS = {"text": read_text, "jsonl": read_jsonl, "parquet": read_parquet, "csv": read_csv}


def file_docs(fs, path: str, source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str] | BadInput]:
    """(location, text) of every document in one file, or the BadInput of a line or row to skip.
    Raises BadInput for what spoils the whole file."""
    where = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    reader = READERS[source_format(path, source)]
    compression = infer_compression(path)
    try:
        with fs.open(path, "rb", compression=None if compression == "zstd" else compression) as f:
            if compression == "zstd":  # zstandard's own reader has no readline: buffer it
                f = stdio.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
            elif isinstance(f, AbstractBufferedFile):  # a remote file (s3://...): its readline takes no limit
                f = stdio.BufferedReader(f)
            yield from reader(f, where, source, cfg)
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
        raise BadInput(f"{where}: truncated or corrupt compressed file: {e or type(e).__name__}") from None
    except OSError as e:
        raise BadInput(f"{where}: cannot read: {e or type(e).__name__}") from None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts))


HELP_TOPICS = "pydoc_data.topics"
"""The builtin source's last unit: the interpreter's bundled help() topics."""


def builtin_python_docs(path: str, max_bytes: int) -> Iterator[tuple[str, str]]:
    """(location, text) of one stdlib source file, or of every bundled help() topic."""
    if path == HELP_TOPICS:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield f"{HELP_TOPICS}:{name}", topics[name]
        return
    data = Path(path).read_bytes()
    if len(data) <= max_bytes:
        root = Path(sysconfig.get_paths()["stdlib"])
        yield f"stdlib/{Path(path).relative_to(root)}", decode(data, "utf-8", path)


class Skipped:
    """What on_error: skip passed over: counts by kind and the first few messages."""

    def __init__(self, on_error: str):
        self.on_error, self.files, self.records, self.examples = on_error, 0, 0, []

    def __call__(self, error: BadInput, whole_file: bool) -> None:
        if self.on_error == "raise":
            raise error
        log.warning("ingest: skipped %s", error)
        self.files += whole_file
        self.records += not whole_file
        if len(self.examples) < 10:
            self.examples.append(str(error))

    def report(self) -> dict:
        return {"files": self.files, "records": self.records, "examples": self.examples}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One file of one source (or the builtin help topics): what a worker reads, and what is read again only when
    its version changes."""

    source: Source
    fs: fsspec.AbstractFileSystem | None  # None: the builtin source
    path: str
    version: str  # size and mtime or ETag, as the filesystem reports them


def units(cfg: IngestConfig) -> list[Unit]:
    """Every source's files, in order."""
    found = []
    for source in cfg.sources:
        if source.path in BUILTIN_SOURCES:
            parts = BUILTIN_SOURCES[source.path]
            if "source" in parts:
                found += [
                    Unit(source, None, str(p), f"{st.st_size}:{st.st_mtime_ns}")
                    for p in stdlib_files()
                    if (st := p.stat())
                ]
            if "docs" in parts:
                found.append(Unit(source, None, HELP_TOPICS, sys.version))
            continue
        fs, files = list_files(source.path, cfg.extensions)
        found += [Unit(source, fs, path, f"{info.get('size')}:{version_of(info)}") for path, info in files.items()]
    return found


def unit_key(unit: Unit, cfg: IngestConfig) -> str:
    """What a unit's documents depend on: its source's settings, the reading settings, the file and its version,
    and this reading code."""
    reading = {k: getattr(cfg, k) for k in ("max_bytes_per_file", "max_line_bytes", "on_error", "fix_mojibake")}
    what = [dataclasses.asdict(unit.source), reading, unit.path, unit.version, READING_CODE]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


READING_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def read_unit(unit: Unit, cfg: IngestConfig, fragment: Path) -> None:
    """Read one unit's documents, normalized, into a Parquet fragment, in row groups of bounded size (a file is never
    held whole), each document with its length in characters (what the shards are cut by); what was skipped and the
    unit's counts go in its metadata. Under on_error: raise, a bad file, line or row raises here."""
    source, name = unit.source, unit.source.name or unit.source.path
    counts = {"files": int(unit.fs is not None), "documents": 0, "bytes": 0, "mojibake_fixed": 0, "skipped": []}
    if unit.fs is None:
        items = builtin_python_docs(unit.path, cfg.max_bytes_per_file)
    else:
        items = file_docs(unit.fs, unit.path, source, cfg)
    with io.atomic_file(fragment) as tmp, pq.ParquetWriter(tmp, FRAGMENT) as writer:
        group, group_chars = [], 0
        try:
            for item in items:
                if isinstance(item, BadInput):
                    if cfg.on_error == "raise":
                        raise item
                    counts["skipped"].append([str(item), False])
                    continue
                location, text = item
                text = normalize(text)
                if cfg.fix_mojibake and (fixed := ftfy.fix_encoding(text)) != text:
                    text = fixed
                    counts["mojibake_fixed"] += 1
                if not text.strip():
                    continue
                counts["documents"] += 1
                counts["bytes"] += len(text.encode())
                group.append(
                    {"id": doc_id(text), "text": text, "source": name, "domain": source.domain, "location": location}
                    | {"chars": len(text)}
                )
                group_chars += len(text)
                if len(group) >= FRAGMENT_GROUP_ROWS or group_chars >= FRAGMENT_GROUP_CHARS:
                    writer.write_table(pa.Table.from_pylist(group, schema=FRAGMENT))
                    group, group_chars = [], 0
        except BadInput as e:
            if cfg.on_error == "raise":
                raise
            counts["skipped"].append([str(e), True])
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=FRAGMENT))
        writer.add_key_value_metadata({"ingest": json.dumps(counts)})


FRAGMENT = pa.schema([*((name, pa.string()) for name in tables.RAW_COLUMNS), ("chars", pa.int64())])
FRAGMENT_GROUP_ROWS, FRAGMENT_GROUP_CHARS = 10_000, 32_000_000


def plan_shards(fragments: list[Path], shard_rows: int, shard_chars: int) -> list[list[tuple[Path, int, int]]]:
    """The fragments' documents, in order, cut into shards: a shard closes once it holds shard_rows documents or
    shard_chars characters. Each shard is a list of (fragment, first row, end row)."""
    shards, current, rows, chars = [], [], 0, 0
    for fragment in fragments:
        ends = np.cumsum(pq.read_table(fragment, columns=["chars"])["chars"].to_numpy())
        start = 0
        while start < len(ends):
            before = int(ends[start - 1]) if start else 0
            by_rows = start + shard_rows - rows - 1
            by_chars = int(np.searchsorted(ends, before + shard_chars - chars, side="left"))
            cut = min(by_rows, by_chars)
            if cut >= len(ends):
                current.append((fragment, start, len(ends)))
                rows, chars = rows + len(ends) - start, chars + int(ends[-1]) - before
                break
            current.append((fragment, start, cut + 1))
            shards.append(current)
            current, rows, chars, start = [], 0, 0, cut + 1
    return shards + [current] if current else shards


def fragment_rows(fragment: Path, start: int, end: int) -> pa.Table:
    """Rows start..end of a fragment, reading only the row groups that hold them."""
    f = pq.ParquetFile(fragment)
    groups, first, offset = [], 0, 0
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if offset < end and offset + rows > start:
            first = first if groups else offset
            groups.append(g)
        offset += rows
    return f.read_row_groups(groups).slice(start - first, end - start)


def write_raw_shard(pieces: list[tuple[Path, int, int]], path: Path) -> None:
    table = pa.concat_tables([fragment_rows(*piece) for piece in pieces]).drop_columns(["chars"])
    tables.write_shard(table.to_pandas(), path, tables.RAW_DOCS)


def tally(found: list[tuple[Unit, Path]], cfg: IngestConfig) -> tuple[dict[str, dict], Skipped]:
    """Each source's files, documents and bytes, and what was skipped, from the fragments' metadata."""
    per_source: dict[str, dict] = {}
    for source in cfg.sources:
        per_source[source.name or source.path] = {"files": 0, "documents": 0, "bytes": 0}
        if cfg.fix_mojibake:
            per_source[source.name or source.path]["mojibake_fixed"] = 0
    skipped = Skipped(cfg.on_error)
    for unit, fragment in found:
        counts = json.loads(pq.read_metadata(fragment).metadata[b"ingest"])
        for message, whole_file in counts.pop("skipped"):
            skipped(BadInput(message), whole_file)
        stats = per_source[unit.source.name or unit.source.path]
        for key in stats:
            stats[key] += counts[key]
    return per_source, skipped


def run(params: Params, tracker: Tracker) -> dict:
    """Read the sources' new and changed files (each once, into a cache of per-file fragments), then cut every
    file's documents, in order, into bounded shards in paths.raw, both on ingest.workers processes; returns the
    metrics. The shards are the same for any worker count, and whether a file came from the cache or not."""
    cfg, paths = params.ingest, params.paths
    cache = paths.cache_dir("ingest") / "files"
    cache.mkdir(parents=True, exist_ok=True)
    found = [(unit, cache / f"{unit_key(unit, cfg)}.parquet") for unit in units(cfg)]
    todo = [(unit, cfg, fragment) for unit, fragment in found if not fragment.exists()]
    log.info("ingest: %d files, %d new or changed", len(found), len(todo))
    with Workers(cfg.workers) as pool:
        started = time.perf_counter()
        for done, _ in enumerate(pool.map(read_unit, todo), 1):
            if done % 500 == 0 or done == len(todo):
                log.info("ingest: %d of %d new or changed files read", done, len(todo))
        seconds = {"read": round(time.perf_counter() - started, 1)}
        started = time.perf_counter()
        per_source, skipped = tally(found, cfg)
        total = sum(s["documents"] for s in per_source.values())
        if not total:
            raise io.DataError(
                f"ingest: the sources {[s.path for s in cfg.sources]} hold no non-empty document"
                + (f" ({skipped.files} files and {skipped.records} records skipped)" if skipped.examples else "")
            )
        shards = plan_shards([fragment for _, fragment in found], cfg.shard_rows, cfg.shard_bytes)
        with io.atomic_dir(paths.raw) as out:
            jobs = [(pieces, out / f"part-{i:05d}.parquet") for i, pieces in enumerate(shards)]
            for done, _ in enumerate(pool.map(write_raw_shard, jobs), 1):
                log.info("ingest: %d of %d shards written", done, len(jobs))
        seconds["write"] = round(time.perf_counter() - started, 1)
    kept = {fragment for _, fragment in found}
    for stale in set(cache.glob("*.parquet")) - kept:  # removed or changed files' documents
        stale.unlink()
    return {
        "documents": total,
        "bytes": sum(s["bytes"] for s in per_source.values()),
        "shards": len(shards),
        "sources": per_source,
        "skipped": skipped.report(),
        "files_read": len(todo),
        cost.PHASES: seconds,
    } | ({"mojibake_fixed": sum(s["mojibake_fixed"] for s in per_source.values())} if cfg.fix_mojibake else {})


if __name__ == "__main__":
    cli.main(run)
