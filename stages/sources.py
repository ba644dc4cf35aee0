"""sources: a fingerprint of every ingest source, so that `dvc repro` (and each scheduled run) notices new or
changed input data anywhere fsspec reaches, which DVC cannot track itself.

Inputs:  ingest.sources, ingest.extensions
Outputs: ${paths.sources_fingerprint}: per source the number of files, their bytes, and a digest of every file's
         path, size and modification time (or ETag/checksum where the filesystem gives one)

DVC runs this stage every time (always_changed); it only lists files, so it is quick, and ingest reruns only
when the fingerprint differs. Deliberately light: no MLflow run, no pandas.
"""

import hashlib
import logging
import platform
import sys

import fsspec

from stages import io
from stages.config import BUILTIN_PYTHON, ConfigError, IngestConfig, Source, load_params

log = logging.getLogger("stages.sources")
_VERSION_KEYS = ("ETag", "etag", "md5", "checksum", "mtime", "LastModified", "last_modified", "created")


def _version(info: dict) -> str:
    """What changes when a file's content does, as this filesystem reports it."""
    return next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")


def list_files(source: Source, extensions: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, dict[str, dict]]:
    """A file, a folder (recursively: the files ending in one of `extensions`) or a glob, local or an fsspec URL
    -> its filesystem and {path: info}, sorted."""
    fs, root = fsspec.core.url_to_fs(source.path)
    if fs.isfile(root):
        files = {root: fs.info(root)}
    elif fs.isdir(root):
        endings = tuple(e.lower() for e in extensions)
        files = {p: info for p, info in fs.find(root, detail=True).items() if p.lower().endswith(endings)}
    else:
        files = {p: fs.info(p) for p in fs.glob(root) if fs.isfile(p)}
    if not files:
        raise io.DataError(f"ingest.sources: {source.path!r} matches no file")
    return fs, dict(sorted(files.items()))


def fingerprint(cfg: IngestConfig) -> dict:
    sources = {}
    for source in cfg.sources:
        if source.path == BUILTIN_PYTHON:  # the interpreter's own files: its version says it all
            sources[source.path] = {"python": f"{platform.python_implementation()} {sys.version}"}
            continue
        _, files = list_files(source, cfg.extensions)
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].get('size')}\0{_version(files[path])}\n".encode())
        sizes = [info.get("size") or 0 for info in files.values()]
        sources[source.path] = {"files": len(files), "bytes": sum(sizes), "digest": digest.hexdigest()}
    return {"sources": sources}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        params = load_params()
        found = fingerprint(params.ingest)
    except (ConfigError, io.DataError, OSError) as e:
        log.error("sources failed: %s", e)
        sys.exit(1)
    io.write_json(params.paths.sources_fingerprint, found)  # DVC compares it with the last run's
    log.info("sources: %s", found["sources"])


if __name__ == "__main__":
    main()
