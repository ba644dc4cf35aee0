"""Resumable training: Lightning checkpoints every N steps in a directory that outlives the run: a folder, or an
fsspec URL (s3://...) that any machine of a team can resume from.

A run resumes only from checkpoints of the same run: `run.json` holds a fingerprint of everything that shapes
training (model, optimizer, data, seed, and the training code itself); a different fingerprint clears the
directory and starts afresh. So a killed run resumes, while a run that DVC repeats because its code or
params changed trains anew.
"""

import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import fsspec
from lightning.pytorch.callbacks import ModelCheckpoint

FINGERPRINT = "run.json"
_STEP = re.compile(r"^step=(\d+)\.ckpt$")


def code_digest(*packages: Path) -> str:
    """sha256 over the Python sources of the given package directories."""
    digest = hashlib.sha256()
    for package in packages:
        for source in sorted(Path(package).rglob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


def join(ckpt_dir: str | Path, name: str) -> str:
    """`name` in ckpt_dir, a folder or an fsspec URL (pathlib would fold the // of s3://...)."""
    return f"{str(ckpt_dir).rstrip('/')}/{name}"


def _fs(ckpt_dir: str | Path):
    """The filesystem of ckpt_dir and its path there, its listings fresh: another machine may have written."""
    fs, root = fsspec.core.url_to_fs(str(ckpt_dir))
    fs.invalidate_cache(root)
    return fs, root


def checkpoints(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints, oldest first; a file cut short by a kill is not complete."""
    fs, root = _fs(ckpt_dir)
    found = []
    for path in fs.glob(f"{root}/step=*.ckpt"):
        name = path.rsplit("/", 1)[-1]
        if match := _STEP.match(name):
            with fs.open(path, "rb") as f:
                if zipfile.is_zipfile(f):
                    found.append((int(match[1]), join(ckpt_dir, name)))
    return sorted(found)


def resume_from(
    ckpt_dir: str | Path, fingerprint: dict, rank: int = 0, barrier: Callable[[], None] | None = None
) -> str | None:
    """The newest complete checkpoint of this same run, or None (after deleting another run's checkpoints; other
    files, such as distill's teacher cache, stay). ckpt_dir may be remote (s3://...): a run killed on one
    machine then resumes on another. Where a launcher started every rank at once (torchrun, srun), rank zero alone
    claims the folder (clears, writes run.json) and the others look only after `barrier`: all resume alike."""
    fs, root = _fs(ckpt_dir)
    marker = f"{root}/{FINGERPRINT}"
    if rank == 0 and not (fs.exists(marker) and json.loads(fs.cat_file(marker)) == fingerprint):
        fs.makedirs(root, exist_ok=True)
        for stale in fs.glob(f"{root}/step=*.ckpt"):
            fs.rm(stale)
        fs.pipe_file(marker, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())
    if barrier:
        barrier()
    found = checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def every_n_steps(ckpt_dir: str | Path, every: int, keep: int) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=every, save_top_k=keep, monitor="step", mode="max"
    )


def keep_last(ckpt_dir: str | Path, keep: int) -> None:
    fs, _ = _fs(ckpt_dir)
    for _, path in checkpoints(ckpt_dir)[:-keep]:
        fs.rm(fsspec.core.url_to_fs(path)[1])
