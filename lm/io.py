"""Files written atomically, JSON, and the error raised for bad data. Light to import: the Parquet tables and
their schemas are in lm/tables.py."""

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path


class DataError(ValueError):
    """Input or artifact content that cannot be used; the message names the file and what is wrong."""


def temp_prefix(path: Path) -> str:
    """The name start of a temp beside `path`: its host and pid tell a later writer whether it was left by a
    dead process (remove_leftovers)."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def remove_leftovers(path: Path) -> None:
    """Remove the temps a killed process of this host left beside `path` (a live process's are its own)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(socket.gethostname())}\.(\d+)\.\w+\.(tmp|old)")
    for leftover in path.parent.iterdir():
        match = pattern.fullmatch(leftover.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp directory beside `path`; it replaces `path` only if the block succeeds. `path` is never a
    part-written or part-removed directory: the old one is renamed aside, the new one renamed in, then the old
    one removed (a kill between the renames leaves no `path`, and temps that the next writer removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
