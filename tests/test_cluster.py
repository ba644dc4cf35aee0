"""Curation on the engines a cluster runs: datatrove's Ray executor on a real Ray cluster started here on
127.0.0.1, with the data on a real S3 server (moto). The curated shards are byte-identical to the local
executor's, and a task that fails on a worker fails the stage with that task's error line."""

import contextlib
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from test_curate import edit, random_doc, write_raw

from flows.server import free_port
from flows.services import BUCKETS, s3_only
from lm import io
from stages import curate
from stages.config import Paths, parse_params
from stages.tracking import NO_TRACKING

RAY = Path(sys.executable).parent / "ray"
# Ray binds to the machine's outward address unless told that it is a one-machine cluster
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_only(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """`ray start --head` with 2 CPUs on 127.0.0.1; its workers see the S3 server as the stage does."""
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 characters
    env = os.environ | s3 | LOOPBACK_ONLY
    port = free_port()
    head = [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    subprocess.run([*head, "--disable-usage-stats", "--temp-dir", temp], env=env, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_s3(s3, monkeypatch):
    for key, value in (s3 | LOOPBACK_ONLY).items():
        monkeypatch.setenv(key, value)
    return s3


def texts() -> list[str]:
    rng = random.Random(3)
    originals = [random_doc(rng) for _ in range(60)]
    return originals + [edit(rng, t, 0.01) for t in originals[:10]] + [t.upper() for t in originals[10:15]]


def left_on_s3(url: str) -> list[str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with contextlib.suppress(FileNotFoundError):
        return fs.find(url)
    return []


def curate_into(root: Path, raw: Path, **overrides) -> tuple[dict, dict[str, bytes]]:
    """curate.run from raw into root/curated with 3 tasks; its metrics, and every curated file's bytes. MinHash in 4
    bands: 4 bucket tasks, not 12 (each Ray task costs seconds to place)."""
    cfg = {"min_chars": 1, "min_alpha_fraction": 0.0, "val_fraction": 0.2, "tasks": 3, "workers": 2} | overrides
    cfg["near_dedup"] = {"bands": 4, "rows": 5}
    paths = Paths(raw=str(raw), curated=str(root / "curated"), reports=str(root / "reports"), plots=str(root / "plots"))
    metrics = curate.run(dataclasses.replace(parse_params({"curate": cfg}), paths=paths), NO_TRACKING)
    files = {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / "curated").rglob("*.parquet"))}
    return metrics, files


def test_curate_on_ray_with_data_on_s3_writes_what_the_local_executor_writes(ray_cluster, on_s3, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    local = curate_into(tmp_path / "local", raw)
    work = f"s3://{BUCKETS['data']}/curate-work"
    on_ray = curate_into(tmp_path / "ray", raw, executor="ray", ray={"address": ray_cluster}, work_dir=work)
    assert on_ray == local
    metrics, files = on_ray
    assert len({name.split("-")[1] for name in files}) == 3, "three tasks wrote shards"
    assert metrics["train"]["documents"] + metrics["val"]["documents"] == 60
    assert not left_on_s3(work), "the run's work folder is left on S3"


def test_a_task_failing_on_a_ray_worker_fails_the_stage_with_its_error(ray_cluster, on_s3, tmp_path):
    raw = write_raw(tmp_path / "raw", texts(), shards=4)
    bad = pd.read_parquet(raw / "part-00001.parquet").assign(id="not-a-content-hash")
    bad.to_parquet(raw / "part-00001.parquet", index=False)
    work = f"s3://{BUCKETS['data']}/curate-failing"
    with pytest.raises(io.DataError) as failure:
        curate_into(tmp_path, raw, executor="ray", ray={"address": ray_cluster}, work_dir=work)
    message = str(failure.value)
    print(message)
    assert message.startswith("curate: pass 1 on ray: 1 of 3 tasks did not finish; task 1: ")
    assert f"{work}/curate-" in message and "part-00001.parquet: does not match the raw documents schema" in message
    assert not (tmp_path / "curated").exists() and not left_on_s3(work)
