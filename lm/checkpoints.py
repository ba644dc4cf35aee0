"""Resumable training: Lightning checkpoints every N steps in a directory that outlives the run (DVC `persist`).

A run resumes only from checkpoints of the same run: `run.json` holds a fingerprint of everything that shapes
training (model, optimizer, data, seed, and the training code itself); a different fingerprint clears the
directory and starts afresh. So a killed run resumes, while a run that DVC repeats because its code or
params changed trains anew.
"""

import hashlib
import json
import re
import zipfile
from pathlib import Path

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


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first; a file cut short by a kill is not complete."""
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step=*.ckpt") if (m := _STEP.match(p.name))]
    return sorted((step, p) for step, p in found if zipfile.is_zipfile(p))


def resume_from(ckpt_dir: Path, fingerprint: dict) -> Path | None:
    """The newest complete checkpoint of this same run, or None (after deleting another run's checkpoints; other
    files, such as distill's teacher cache, stay)."""
    marker = ckpt_dir / FINGERPRINT
    if marker.exists() and json.loads(marker.read_text()) == fingerprint:
        found = checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob("step=*.ckpt"):
        stale.unlink()
    marker.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return None


def every_n_steps(ckpt_dir: Path, every: int, keep: int) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every, save_top_k=keep, monitor="step", mode="max"
    )


def keep_last(ckpt_dir: Path, keep: int) -> None:
    for _, path in checkpoints(ckpt_dir)[:-keep]:
        path.unlink()
