import dataclasses
import random
from pathlib import Path

import pytest

from stages import registry
from stages.config import Params, parse_params
from stages.tracking import NO_TRACKING
from tiny import TINY

WORDS = (
    "data model train token layer loss weight value batch step learn curve text corpus byte merge "
    "python function return class import module test sample filter clean split shard write read"
).split()


def write_corpus(root: Path, n_docs: int = 80, seed: int = 0) -> Path:
    """Seeded prose-like documents, plus one exact duplicate (modulo whitespace), one short and one non-text doc."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            " ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(rng.randint(8, 20))
        ]
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "dup.txt").write_text("  " + (root / "doc000.txt").read_text().replace(" ", "   "))
    (root / "short.txt").write_text("Too short to keep.\n")
    (root / "numbers.txt").write_text(
        "\n".join(" ".join(str(rng.randint(0, 9999)) for _ in range(20)) for _ in range(10))
    )
    return root


def tiny_params(tmp: Path) -> Params:
    corpus = write_corpus(tmp / "corpus")
    data = {k: dict(v) for k, v in TINY.items()}
    data["ingest"] = {**TINY["ingest"], "sources": [{**TINY["ingest"]["sources"][0], "path": str(corpus)}]}
    params = parse_params(data)
    return dataclasses.replace(params, paths=rooted(params.paths, tmp))


def rooted(paths, root: Path):
    """paths (a Paths or ModelPaths) with every path under root."""
    moved = {}
    for f in dataclasses.fields(paths):
        value = getattr(paths, f.name)
        moved[f.name] = rooted(value, root) if dataclasses.is_dataclass(value) else str(root / value)
    return dataclasses.replace(paths, **moved)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> tuple[Params, dict]:
    """Every stage's run() once, in dvc.yaml's order, on the tiny corpus; returns the params and each stage's
    metrics."""
    p = tiny_params(tmp_path_factory.mktemp("pipeline"))
    return p, {name: run(p, NO_TRACKING) for name, run in registry().items()}


@pytest.fixture(scope="session")
def prefect_server():
    """One real local Prefect server (with its scheduler) for the session; yields the env that points at it."""
    from flows.server import local_server

    with local_server(scheduler_loop_s=2) as env:
        yield env


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """This process's Prefect client pointed at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in prefect_server.items():
        monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield prefect_server["PREFECT_API_URL"]
