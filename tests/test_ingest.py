import gzip
import json
import re

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lm import io, tables
from stages import ingest
from stages.config import ConfigError, IngestConfig, Params, Paths, Source
from stages.tracking import NO_TRACKING

DOCS = ["First document about parsing.", "Second one: caf\u00e9 and na\u00efve.", "Third, with\ttabs."]


def ingest_into(cfg: IngestConfig, raw) -> dict:
    """The ingest stage's run() on these sources, writing to raw."""
    return ingest.run(Params(ingest=cfg, paths=Paths(raw=str(raw), checkpoints=f"{raw}.checkpoints")), NO_TRACKING)


def ingest_one(tmp_path, path, on_error="raise", **source):
    cfg = IngestConfig(sources=(Source(path=str(path), name="s", **source),), on_error=on_error)
    out = tmp_path / "raw"
    metrics = ingest_into(cfg, out)
    return metrics, tables.read_shards(out, tables.RAW_DOCS)


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_normalize_bom_newlines_nfc_and_controls():
    assert ingest.normalize("\ufeffa\r\nb\rc\x00d\x07e\tf") == "a\nb\ncde\tf"
    assert ingest.normalize("e\u0301") == "\u00e9"  # NFC


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_jsonl_plain_gzip_and_zstd(tmp_path, suffix):
    path = tmp_path / f"docs.{suffix}"
    records = [{"text": t, "meta": i} for i, t in enumerate(DOCS)]
    if suffix == "jsonl.zst":
        with zstandard.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        write_jsonl(path, records, gzip.open if suffix.endswith(".gz") else open)
    metrics, df = ingest_one(tmp_path, path)
    assert list(df["text"]) == DOCS and metrics["documents"] == 3
    assert list(df["location"]) == [f"{path}:{n}" for n in (1, 2, 3)], "file and line"
    assert list(df["id"]) == [ingest.doc_id(t) for t in DOCS], "the content hash"


def test_parquet_and_csv_with_a_configured_text_column(tmp_path):
    pq.write_table(pa.table({"body": DOCS, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    _, df = ingest_one(tmp_path, tmp_path / "d.parquet", text_column="body")
    assert list(df["text"]) == DOCS and df["location"].iloc[2].endswith("d.parquet:row 3")
    pd.DataFrame({"id": [1, 2, 3], "content": DOCS}).to_csv(tmp_path / "d.csv", index=False)
    _, df = ingest_one(tmp_path, tmp_path / "d.csv", text_column="content")
    assert list(df["text"]) == DOCS and df["location"].iloc[0].endswith("d.csv:row 1")


def test_fsspec_memory_and_file_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/corpus/a.jsonl", "w") as f:
        f.write(json.dumps({"text": DOCS[0]}) + "\n")
    with fs.open("/corpus/b.txt", "w") as f:
        f.write(DOCS[1])
    _, df = ingest_one(tmp_path, "memory://corpus", format="auto")
    assert sorted(df["text"]) == sorted(DOCS[:2]) and df["location"].str.startswith("memory://").all()
    (tmp_path / "c.txt").write_text(DOCS[2])
    _, df = ingest_one(tmp_path, f"file://{tmp_path}/*.txt")
    assert list(df["text"]) == [DOCS[2]]


def test_encoding_policy_named_codec_and_detection(tmp_path):
    latin = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, d\u00e9j\u00e0 vu, na\u00efve fa\u00e7ade. " * 4
    (tmp_path / "l.txt").write_bytes(latin.encode("latin-1"))
    with pytest.raises(io.DataError, match=r"l.txt: line 1: not utf-8"):
        ingest_one(tmp_path, tmp_path / "l.txt")
    assert list(ingest_one(tmp_path, tmp_path / "l.txt", encoding="latin-1")[1]["text"]) == [latin]
    (tmp_path / "u16.txt").write_bytes(latin.encode("utf-16"))  # a Windows export: not UTF-8, BOM says what
    assert list(ingest_one(tmp_path, tmp_path / "u16.txt", encoding="detect")[1]["text"]) == [latin]
    csv_text = "text,n\n" + "".join(f'"{latin}",{i}\n' for i in range(3))
    (tmp_path / "c.csv").write_bytes(csv_text.encode("utf-16"))  # streamed: detected on its first MB
    assert list(ingest_one(tmp_path, tmp_path / "c.csv", encoding="detect")[1]["text"]) == [latin] * 3
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfwith a BOM\r\nand CRLF\r\n")
    assert list(ingest_one(tmp_path, tmp_path / "bom.txt")[1]["text"]) == ["with a BOM\nand CRLF\n"]
    with pytest.raises(ConfigError, match="encoding 'klingon' is not a codec"):
        Source(path="x", encoding="klingon")


def test_shards_are_bounded_by_bytes_and_rows_with_stable_ids(tmp_path):
    for i in range(6):
        (tmp_path / "in" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "sub" / f"{i}.md").write_text(f"# doc {i}\r\n" + "text " * 20)
    source = Source(path=str(tmp_path / "in"), name="notes", domain="web")
    by_bytes = IngestConfig(sources=(source,), shard_bytes=200)  # a shard closes after two 108-byte documents
    metrics = ingest_into(by_bytes, tmp_path / "raw")
    assert metrics["documents"] == 6 and metrics["shards"] == 3 and metrics["sources"]["notes"]["files"] == 6
    df = tables.read_shards(tmp_path / "raw", tables.RAW_DOCS)
    assert set(df["domain"]) == {"web"} and df["text"].str.contains("\r").sum() == 0
    by_rows = IngestConfig(sources=(source,), shard_rows=4)
    assert ingest_into(by_rows, tmp_path / "raw2")["shards"] == 2
    pd.testing.assert_frame_equal(df, tables.read_shards(tmp_path / "raw2", tables.RAW_DOCS))


def test_builtin_corpus_is_stdlib_source_and_help_topics():
    files = ingest.stdlib_files()
    assert len(files) > 300 and not any("site-packages" in f.parts for f in files)
    units = ingest.units(IngestConfig(sources=(Source(path="builtin:python"),)))
    assert [u.path for u in units] == [*map(str, files), ingest.HELP_TOPICS]
    by_domain = {u.path: u.source.domain for u in ingest.units(IngestConfig())}  # the default: two domains
    assert by_domain.pop(ingest.HELP_TOPICS) == "docs" and set(by_domain.values()) == {"code"}
    assert list(by_domain) == list(map(str, files))
    locations = [loc for u in units for loc, _ in ingest.builtin_python_docs(u.path, max_bytes=8_000_000)]
    assert any(loc.startswith("pydoc_data.topics:") for loc in locations)
    assert "stdlib/json/__init__.py" in locations


def bad_inputs(tmp_path) -> dict:
    """Each bad input -> (its file, what the error says)."""
    cases = {}

    def case(name, content: bytes, message):
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        cases[name] = (path, message)

    case("empty.txt", b"", "empty file")
    case("latin1.txt", b"ok\n\xe9t\xe9\n", "line 2: not utf-8")
    case("nul.txt", b"text\nmore\x00\x00\x00", r"line 2: NUL byte: a binary file")
    case("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "NUL byte: a binary file")
    case("truncated.jsonl.gz", gzip.compress(b'{"text": "a whole line"}\n' * 200)[:-40], "truncated or corrupt")
    case("corrupt.parquet", b"PAR1" + b"\x00garbage" * 50 + b"PAR1", "not a readable Parquet file")
    case("no_text.parquet", b"", "no 'text' column (has: body)")
    pq.write_table(pa.table({"body": ["x"]}), cases["no_text.parquet"][0])
    case("no_text.csv", b"title,body\na,b\n", "no 'text' column (has: title, body)")
    cases["unreadable"] = ("/proc/self/mem", "cannot read")  # a file every read of which fails, even for root
    return cases


def test_every_bad_file_is_a_clear_error_and_nothing_is_written(tmp_path):
    for name, (path, message) in bad_inputs(tmp_path).items():
        out = tmp_path / "raw"
        cfg = IngestConfig(sources=(Source(path=str(path)),), extensions=(".txt", ".png"))
        with pytest.raises(io.DataError, match=re.escape(message)) as err:
            ingest_into(cfg, out)
        assert str(path) in str(err.value), (name, err.value)
        assert not out.exists(), f"{name}: nothing half-written"


def test_bad_jsonl_lines_name_the_line_and_skip_mode_counts_them(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(
        path,
        [
            {"text": DOCS[0]},
            '{"text": "unterminated',
            {"title": "no text field"},
            {"text": 42},
            {"text": DOCS[1]},
        ],
    )
    with pytest.raises(io.DataError, match=rf"{path}:2: not JSON"):
        ingest_one(tmp_path, path)
    metrics, df = ingest_one(tmp_path, path, on_error="skip")
    assert list(df["text"]) == DOCS[:2]
    skipped = metrics["skipped"]
    assert skipped["records"] == 3 and skipped["files"] == 0
    assert any(":3: no 'text' field (has: title)" in e for e in skipped["examples"])
    assert any(":4: 'text' is int, not a string" in e for e in skipped["examples"])


def test_a_100_mb_line_without_newline_is_refused_in_bounded_pieces(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": DOCS[0]}).encode() + b"\n")
        f.write(b'{"text": "' + b"x" * 100_000_000)  # no closing quote, no newline
    with pytest.raises(io.DataError, match=rf"{path}:2: line longer than ingest.max_line_bytes"):
        ingest_one(tmp_path, path)
    metrics, df = ingest_one(tmp_path, path, on_error="skip")
    assert list(df["text"]) == [DOCS[0]] and metrics["skipped"]["records"] == 1
    text_file = tmp_path / "huge.txt"
    text_file.write_bytes(b"y" * 9_000_000)
    with pytest.raises(io.DataError, match="larger than ingest.max_bytes_per_file"):
        ingest_one(tmp_path, text_file)


def test_skip_mode_passes_over_bad_files_and_counts_them(tmp_path):
    cases = bad_inputs(tmp_path)
    (tmp_path / "bad" / "good.txt").write_text(DOCS[0])
    extensions = (".txt", ".png", ".gz", ".parquet", ".csv")
    cfg = IngestConfig(sources=(Source(path=str(tmp_path / "bad")),), extensions=extensions, on_error="skip")
    metrics = ingest_into(cfg, tmp_path / "raw")
    assert metrics["documents"] == 1 and metrics["skipped"]["files"] == len(cases) - 1  # all but /proc/self/mem
    assert list(tables.read_shards(tmp_path / "raw", tables.RAW_DOCS)["text"]) == [DOCS[0]]


def test_missing_source_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(io.DataError, match="matches no file"):
        ingest_into(IngestConfig(sources=(Source(path=str(tmp_path / "nope*.txt")),)), tmp_path / "r")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(io.DataError, match="hold no non-empty document"):
        ingest_into(IngestConfig(sources=(Source(path=str(tmp_path / "blank.txt")),)), tmp_path / "r")
    (tmp_path / "only_bad.txt").write_bytes(b"\xff\xfe\x00")
    cfg = IngestConfig(sources=(Source(path=str(tmp_path / "only_bad.txt")),), on_error="skip")
    with pytest.raises(io.DataError, match=r"hold no non-empty document \(1 files and 0 records skipped\)"):
        ingest_into(cfg, tmp_path / "r")


def test_sources_fingerprint_changes_with_the_data_not_with_nothing(tmp_path):
    from lm.sources import fingerprint

    extensions = IngestConfig().extensions
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(DOCS[0])
    sources = [str(tmp_path / "in"), "builtin:python"]
    first = fingerprint(sources, extensions)
    assert fingerprint(sources, extensions) == first and first["sources"][str(tmp_path / "in")]["files"] == 1
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n")
    added = fingerprint(sources, extensions)
    assert added != first and added["sources"][str(tmp_path / "in")]["files"] == 2
    (tmp_path / "in" / "a.txt").write_text(DOCS[0] + " edited")
    assert fingerprint(sources, extensions) != added, "a changed file (size, mtime) is a changed fingerprint"
    fs = fsspec.filesystem("memory")
    fs.pipe("/fp/x.txt", b"one")
    before = fingerprint(["memory://fp"], extensions)
    fs.pipe("/fp/x.txt", b"two, longer")
    assert fingerprint(["memory://fp"], extensions) != before


def damaged_string_payload(path, groups: int = 3) -> None:
    """A Parquet file of `groups` row groups whose middle one's string bytes are no longer UTF-8: footer and page
    headers intact, only the (uncompressed) payload damaged, as a bad disk or copy leaves it."""
    table = pa.table({"text": [f"doc {i} " + "é" * 40 for i in range(groups * 2)]})
    pq.write_table(table, path, row_group_size=2, compression="none", use_dictionary=False, write_statistics=False)
    data = bytearray(path.read_bytes())
    middle = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = middle.data_page_offset
    at = data.index("é".encode(), start)
    data[at] = 0xFF  # a byte UTF-8 never has
    path.write_bytes(bytes(data))


def test_a_damaged_parquet_payload_is_its_row_groups_error(tmp_path):
    path = tmp_path / "damaged.parquet"
    damaged_string_payload(path)
    with pytest.raises(io.DataError, match=rf"^{re.escape(str(path))}: row group 1 \(rows 3-\): unreadable Parquet"):
        ingest_one(tmp_path, path)
    assert not (tmp_path / "raw").exists()
    metrics, df = ingest_one(tmp_path, path, on_error="skip")
    assert metrics["skipped"]["records"] == 1, "the damaged row group, counted"
    assert [t.split()[1] for t in df["text"]] == ["0", "1", "4", "5"], "the good row groups kept"


def test_a_lone_surrogate_is_that_lines_error(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    write_jsonl(path, [{"text": DOCS[0]}, '{"text": "bad \\ud800 escape"}', {"text": DOCS[1]}])
    with pytest.raises(io.DataError, match=rf"^{re.escape(str(path))}:2: 'text' holds a lone surrogate at character 4"):
        ingest_one(tmp_path, path)
    metrics, df = ingest_one(tmp_path, path, on_error="skip")
    assert list(df["text"]) == DOCS[:2] and metrics["skipped"]["records"] == 1


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_byte_order_mark_states_the_encoding_whatever_the_source_says(tmp_path, codec):
    bom = {"utf-8-sig": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}
    bom |= {"utf-32-le": b"\xff\xfe\x00\x00", "utf-32-be": b"\x00\x00\xfe\xff"}
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    files = {"a.txt": DOCS[1], "b.jsonl": lines, "c.csv": pd.DataFrame({"text": DOCS}).to_csv(index=False)}
    for name, text in files.items():
        (tmp_path / name).write_bytes(bom[codec] + text.encode(codec))
        _, df = ingest_one(tmp_path, tmp_path / name, encoding="latin-1")
        assert list(df["text"]) == ([DOCS[1]] if name == "a.txt" else DOCS), (codec, name)


@pytest.mark.parametrize("documents", ["blank_lines", "lines"])
def test_one_big_text_file_becomes_many_documents_located_by_line(tmp_path, documents):
    """A book in one .txt: paragraphs (or lines) grouped in order up to document_chars, each document located by
    its first line; nothing lost but the separators."""
    paragraphs = [f"Paragraph {i}: " + "word " * (i % 7 + 3) + "\n    indented second line." for i in range(60)]
    book = tmp_path / "book.txt"
    book.write_text("\n\n" + "\n\n  \n".join(paragraphs) + "\n")
    _, df = ingest_one(tmp_path, book, documents=documents, document_chars=300)
    assert len(df) > 10 and df["text"].str.len().max() <= 300
    lines = book.read_text().split("\n")
    for location, text in zip(df["location"], df["text"], strict=True):
        first = int(location.rsplit(":line ", 1)[1])
        assert lines[first - 1] == text.split("\n")[0], location
    joiner = "\n\n" if documents == "blank_lines" else "\n"
    assert joiner.join(df["text"]) == joiner.join(paragraphs), "every paragraph or line, in order, once"
    with pytest.raises(ConfigError, match="document_chars must be >= 1"):
        Source(path="x", document_chars=0)


def test_mojibake_is_repaired_when_asked_and_counted(tmp_path):
    path = tmp_path / "forum.jsonl"
    write_jsonl(path, [{"text": "Ã§a dÃ©pend du cafÃ©"}, {"text": DOCS[1]}, {"text": "plain ascii"}])
    _, as_is = ingest_one(tmp_path, path)
    assert as_is["text"][0] == "Ã§a dÃ©pend du cafÃ©", "off by default: the text as the file has it"
    cfg = IngestConfig(sources=(Source(path=str(path), name="s"),), fix_mojibake=True)
    metrics = ingest_into(cfg, tmp_path / "fixed")
    texts = list(tables.read_shards(tmp_path / "fixed", tables.RAW_DOCS)["text"])
    assert texts == ["ça dépend du café", DOCS[1], "plain ascii"], "right text untouched"
    assert metrics["mojibake_fixed"] == 1 and metrics["sources"]["s"]["mojibake_fixed"] == 1


def shard_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_workers_and_the_file_cache_write_what_one_worker_writes_from_scratch(tmp_path):
    """Any number of workers writes the same shards; a rerun reads only new and changed files (the rest come from
    the cache of each file's documents), drops removed files' documents, and writes what a fresh run writes."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Text file {i}: " + "words " * (i + 1))
    write_jsonl(corpus / "records.jsonl", [{"text": f"record {i}"} for i in range(5)])
    (corpus / "rows.csv").write_text("text\nfirst row\nsecond row\n")

    def ingest_with(workers: int, cache: str, out: str) -> dict:
        cfg = IngestConfig(sources=(Source(path=str(corpus), name="c"),), workers=workers, shard_rows=4)
        paths = Paths(raw=str(tmp_path / out), checkpoints=str(tmp_path / cache))
        metrics = ingest.run(Params(ingest=cfg, paths=paths), NO_TRACKING)
        assert set(metrics.pop("seconds")) == {"read", "write"}, "where the time went: timings vary, the rest not"
        return metrics

    one, two = ingest_with(1, "cache-1", "raw-1"), ingest_with(2, "cache-2", "raw-2")
    assert one == two and one["files_read"] == 8 and one["shards"] == 4
    assert shard_bytes(tmp_path / "raw-1") == shard_bytes(tmp_path / "raw-2")

    (corpus / "doc1.txt").write_text("Text file 1, rewritten.")
    (corpus / "doc9.txt").write_text("A new text file.")
    (corpus / "doc3.txt").unlink()
    again = ingest_with(2, "cache-2", "raw-again")
    fresh = ingest_with(1, "cache-fresh", "raw-fresh")
    assert again["files_read"] == 2 and fresh["files_read"] == 8
    assert {k: v for k, v in again.items() if k != "files_read"} == {
        k: v for k, v in fresh.items() if k != "files_read"
    }
    assert shard_bytes(tmp_path / "raw-again") == shard_bytes(tmp_path / "raw-fresh")
    texts = tables.read_shards(tmp_path / "raw-again", tables.RAW_DOCS)["text"].tolist()
    assert "Text file 1, rewritten." in texts and "A new text file." in texts
    assert not any(t.startswith(("Text file 3", "Text file 1:")) for t in texts)
    assert len(list((tmp_path / "cache-2" / "ingest" / "files").glob("*.parquet"))) == 8, "removed files' cache kept"
