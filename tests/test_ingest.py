import pandas as pd
import pytest

from stages import ingest, io
from stages.config import IngestConfig, Paths, Source


def test_normalize_bom_newlines_nfc_and_controls():
    assert ingest.normalize("\ufeffa\r\nb\rc\x00d\x07e\tf") == "a\nb\ncde\tf"
    assert ingest.normalize("e\u0301") == "\u00e9"  # NFC


def test_non_utf8_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    cfg = IngestConfig(sources=(Source(path=str(tmp_path)),), extensions=(".txt",))
    with pytest.raises(io.DataError, match=rf"{bad}: line 3: not UTF-8"):
        ingest.run(cfg, Paths(raw=str(tmp_path / "raw")))
    assert not (tmp_path / "raw").exists(), "nothing half-written"


def test_missing_source_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(io.DataError, match="matches no file"):
        ingest.run(IngestConfig(sources=(Source(path=str(tmp_path / "nope*.txt")),)), Paths(raw=str(tmp_path / "r")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(io.DataError, match="hold no non-empty document"):
        ingest.run(IngestConfig(sources=(Source(path=str(tmp_path / "empty.txt")),)), Paths(raw=str(tmp_path / "r")))


def test_folder_source_writes_bounded_shards_with_stable_ids(tmp_path):
    for i in range(5):
        (tmp_path / "in" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "sub" / f"{i}.md").write_text(f"# doc {i}\r\ntext\n")
    (tmp_path / "in" / "skip.bin").write_bytes(b"\x00\x01")
    cfg = IngestConfig(sources=(Source(path=str(tmp_path / "in"), name="notes", domain="web"),), shard_rows=2)
    metrics = ingest.run(cfg, Paths(raw=str(tmp_path / "raw")))
    assert metrics["documents"] == 5 and metrics["sources"]["notes"]["documents"] == 5
    assert len(list((tmp_path / "raw").glob("part-*.parquet"))) == 3
    df = io.read_shards(tmp_path / "raw", io.RAW_DOCS)
    assert set(df["domain"]) == {"web"} and df["text"].str.contains("\r").sum() == 0
    again = tmp_path / "raw2"
    ingest.run(cfg, Paths(raw=str(again)))
    pd.testing.assert_frame_equal(df, io.read_shards(again, io.RAW_DOCS))


def test_builtin_corpus_is_stdlib_source_and_help_topics():
    files = ingest.stdlib_files()
    assert len(files) > 300 and not any("site-packages" in f.parts for f in files)
    locations = [loc for loc, _ in ingest.builtin_python_docs(max_bytes=8_000_000)]
    assert any(loc.startswith("pydoc_data.topics:") for loc in locations)
    assert "stdlib/json/__init__.py" in locations
