"""Every reader of ingest fuzzed: random bytes, and valid files cut short, bit-flipped or overwritten by byte runs
(in headers, compressed payloads, dictionary pages: wherever the position falls). Each case must end in one of two
ways: ok, or one clear error line naming the file; never a traceback, never a half-written output. Under
on_error: skip a bad line, row or row group is skipped and counted, never raised.

FUZZ_EXAMPLES cases per reader and kind of damage (CI: 200 × 6 readers × 2 kinds = 2,400, the same cases every
run); `make fuzz` runs 5,000 of each, new ones every time."""

import gzip
import io as stdio
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm import io
from stages import ingest
from stages.config import IngestConfig, Params, Paths, Source
from stages.tracking import NO_TRACKING

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 200))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    database=None,
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60)


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def parquet(docs: list[str]) -> bytes:
    buffer = stdio.BytesIO()
    pd.DataFrame({"text": docs}).to_parquet(buffer, row_group_size=max(1, len(docs) // 3))
    return buffer.getvalue()


FORMATS = {  # file name -> the bytes of a valid file of these documents
    "a.txt": lambda docs: "\n\n".join(docs).encode(),
    "b.jsonl": jsonl,
    "c.jsonl.gz": lambda docs: gzip.compress(jsonl(docs), mtime=0),
    "d.jsonl.zst": lambda docs: zstandard.ZstdCompressor().compress(jsonl(docs)),
    "e.parquet": parquet,
    "f.csv": lambda docs: pd.DataFrame({"text": docs}).to_csv(index=False).encode(),
}


@st.composite
def damaged(draw, name: str) -> bytes:
    """A valid file of `name`'s format, then damaged: cut short, bits flipped, or a run of one byte written over."""
    data = bytearray(FORMATS[name](draw(st.lists(TEXT, min_size=1, max_size=8))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        damage = draw(st.sampled_from(["cut", "flip", "run"]))
        if damage == "cut":
            del data[at:]
        elif damage == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif data:
            data[at : at + draw(st.integers(1, 64))] = bytes([draw(st.integers(0, 255))]) * draw(st.integers(1, 64))
    return bytes(data)


def outcome(name: str, data: bytes, on_error: str) -> tuple[str, dict]:
    """Ingest one file of these bytes: ('ok', the metrics), or (the one-line DataError, {}) after checking nothing
    was half-written."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / name, Path(tmp) / "raw"
        path.write_bytes(data)
        cfg = IngestConfig(sources=(Source(path=str(path), name="s"),), on_error=on_error)
        try:
            metrics = ingest.run(
                Params(ingest=cfg, paths=Paths(raw=str(out), checkpoints=f"{out}.checkpoints")), NO_TRACKING
            )
        except io.DataError as e:
            message = str(e)
            assert "\n" not in message and (str(path) in message or "hold no non-empty document" in message), message
            assert not out.exists(), f"half-written output after: {message}"
            return message.replace(tmp, "<dir>"), {}
        assert out.exists()
        return "ok", json.loads(json.dumps(metrics).replace(tmp, "<dir>"))


@pytest.mark.parametrize("name", list(FORMATS))
@FUZZ
@given(data=st.data())
def test_random_bytes_end_ok_or_in_one_line_naming_the_file(name, data):
    raw = data.draw(st.binary(max_size=512))
    for on_error in ("raise", "skip"):
        outcome(name, raw, on_error)


@pytest.mark.parametrize("name", list(FORMATS))
@FUZZ
@given(data=st.data())
def test_damaged_files_end_ok_or_in_one_line_and_skip_never_raises_a_units_error(name, data):
    raw = data.draw(damaged(name))
    raised, _ = outcome(name, raw, "raise")
    skipped, metrics = outcome(name, raw, "skip")
    # under skip, a bad file, line, row or row group is passed over: only an empty result ends ingest
    assert skipped == "ok" or "hold no non-empty document" in skipped, skipped
    if raised != "ok" and skipped == "ok":
        counted = metrics["skipped"]
        assert counted["files"] + counted["records"] >= 1 and raised in counted["examples"], (raised, counted)
