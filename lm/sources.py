"""Ingest's sources: listing the files behind a path, folder, glob or fsspec URL, and a fingerprint of what they
hold, by which DVC notices new or changed input data that it cannot track itself."""

import hashlib
import platform
import sys

import fsspec

from lm import io

BUILTIN_PYTHON = "builtin:python"
"""The running interpreter's standard library source and bundled docs: the default corpus, on every machine."""
BUILTIN_SOURCES = {BUILTIN_PYTHON: ("source", "docs"), f"{BUILTIN_PYTHON}-source": ("source",)}
BUILTIN_SOURCES[f"{BUILTIN_PYTHON}-docs"] = ("docs",)
"""Each builtin path -> its parts: the stdlib source files, the bundled help() topics (two domains, two paths)."""
_VERSION_KEYS = ("ETag", "etag", "md5", "checksum", "mtime", "LastModified", "last_modified", "created")


def version_of(info: dict) -> str:
    """What changes when a file's content does, as this filesystem reports it."""
    return next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")


def list_files(source: str, extensions: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, dict[str, dict]]:
    """A file, a folder (recursively: the files ending in one of `extensions`) or a glob, local or an fsspec URL
    -> its filesystem and {path: info}, sorted."""
    fs, root = fsspec.core.url_to_fs(source)
    if fs.isfile(root):
        files = {root: fs.info(root)}
    elif fs.isdir(root):
        endings = tuple(e.lower() for e in extensions)
        files = {p: info for p, info in fs.find(root, detail=True).items() if p.lower().endswith(endings)}
    else:
        files = {p: fs.info(p) for p in fs.glob(root) if fs.isfile(p)}
    if not files:
        raise io.DataError(f"ingest.sources: {source!r} matches no file")
    return fs, dict(sorted(files.items()))


def fingerprint(sources: list[str], extensions: tuple[str, ...]) -> dict:
    """Per source: the number of files, their bytes, and a digest of every file's path, size and version."""
    found = {}
    for source in sources:
        if source in BUILTIN_SOURCES:  # the interpreter's own files: its version says it all
            found[source] = {"python": f"{platform.python_implementation()} {sys.version}"}
            continue
        _, files = list_files(source, extensions)
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].get('size')}\0{version_of(files[path])}\n".encode())
        sizes = [info.get("size") or 0 for info in files.values()]
        found[source] = {"files": len(files), "bytes": sum(sizes), "digest": digest.hexdigest()}
    return {"sources": found}
