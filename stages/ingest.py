"""ingest: read the configured sources into Parquet documents.

Inputs:  ingest.sources (`builtin:python`, files, folders, globs)
Outputs: ${paths.raw}/part-*.parquet (id, text, source, domain, location), zstd
Metrics: ${paths.metrics}/ingest.json: documents, bytes, files per source
"""

import glob
import hashlib
import logging
import sysconfig
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from stages import io
from stages.cli import stage_main
from stages.config import IngestConfig, Paths, Source

log = logging.getLogger("stages.ingest")

BUILTIN_PYTHON = "builtin:python"
# Tests and vendored trees hold fixtures (bad encodings, generated data) rather than the library's own text.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {0x7F: None}


def normalize(text: str) -> str:
    """Strip a BOM, turn CRLF/CR into LF, compose to NFC, drop NUL and other control characters."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).translate(_CONTROL)


def doc_id(location: str, text: str) -> str:
    return hashlib.sha256(f"{location}\0{text}".encode()).hexdigest()[:16]


def read_text_file(path: Path, max_bytes: int) -> str:
    size = path.stat().st_size
    if size > max_bytes:
        raise io.DataError(f"{path}: {size} bytes exceeds ingest.max_bytes_per_file ({max_bytes})")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise io.DataError(f"{path}: line {line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts))


def builtin_python_docs(max_bytes: int) -> Iterator[tuple[str, str]]:
    """(location, text) for the running interpreter's stdlib source and its bundled help() topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        yield f"stdlib/{path.relative_to(root)}", read_text_file(path, max_bytes)
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]


def expand(pattern: str, extensions: tuple[str, ...]) -> list[Path]:
    """A file, a folder (recursively, files with the given suffixes) or a glob -> sorted files."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions)
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise io.DataError(f"ingest.sources: {pattern!r} matches no file")
    return files


def source_docs(source: Source, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    if source.path == BUILTIN_PYTHON:
        yield from builtin_python_docs(cfg.max_bytes_per_file)
        return
    for path in expand(source.path, cfg.extensions):
        yield str(path), read_text_file(path, cfg.max_bytes_per_file)


def documents(cfg: IngestConfig) -> Iterator[dict]:
    seen_locations = set()
    for source in cfg.sources:
        name = source.name or source.path
        for location, raw in source_docs(source, cfg):
            text = normalize(raw)
            if location in seen_locations or not text.strip():
                continue
            seen_locations.add(location)
            yield {
                "id": doc_id(location, text),
                "text": text,
                "source": name,
                "domain": source.domain,
                "location": location,
            }


def run(cfg: IngestConfig, paths: Paths) -> dict:
    """Stream every source's documents into paths.raw, cfg.shard_rows per shard; returns the metrics."""
    per_source: dict[str, dict] = {}
    batch: list[dict] = []
    n_shards = 0
    with io.atomic_dir(paths.raw) as out:
        for doc in documents(cfg):
            stats = per_source.setdefault(doc["source"], {"documents": 0, "bytes": 0})
            stats["documents"] += 1
            stats["bytes"] += len(doc["text"].encode())
            batch.append(doc)
            if len(batch) == cfg.shard_rows:
                io.write_shard(pd.DataFrame(batch), out / f"part-{n_shards:05d}.parquet", io.RAW_DOCS)
                n_shards, batch = n_shards + 1, []
                log.info("ingest: %d documents", sum(s["documents"] for s in per_source.values()))
        if not per_source:
            raise io.DataError(f"ingest: the sources {[s.path for s in cfg.sources]} hold no non-empty document")
        if batch:
            io.write_shard(pd.DataFrame(batch), out / f"part-{n_shards:05d}.parquet", io.RAW_DOCS)
    return {
        "documents": sum(s["documents"] for s in per_source.values()),
        "bytes": sum(s["bytes"] for s in per_source.values()),
        "sources": per_source,
    }


def main() -> None:
    stage_main("ingest", lambda p, tracker: run(p.ingest, p.paths), inputs=lambda p: [])


if __name__ == "__main__":
    main()
