"""The curate stage's own datatrove pipeline steps: what datatrove does not have, or has only in a form unusable here.

Each is a datatrove PipelineStep, so the whole curation runs on datatrove's executors (local processes here,
Slurm or Ray the same way). Why each is hand-written:
- RawShardReader / ShardWriter: our Parquet tables, checked against their pandera schemas on read and write.
Every folder they and Measured take is a datatrove DataFolder: a local path, a shared file system or an fsspec URL.
- Measured: docs/bytes in and out of any step, length histograms and examples of what it removed (datatrove's
  stats count documents only).
- RegexWordTokenizer: spaCy's blank English tokenizer (datatrove's default for English) is far slower (bench/curate.py
  times both); Gopher, C4, FineWeb and MinHash all split words.
- PIIRedactor: datatrove's PIIFormatter replaces emails and public IPv4s only; IPv6s, phones and secrets are added here.
- NGramDecontaminator: datatrove's NGramsDecontIndexer reads its evaluation text from lighteval tasks on the hub.
- SplitAndMix, Selector: the train/val split by id, domain mixing weights, a pluggable scoring hook.
"""

import functools
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolder, DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.pii import PIIFormatter, PIIReplacer, public_ip_validator
from datatrove.utils.lid import FT176LID
from datatrove.utils.word_tokenizers import WordTokenizer

from lm import io, tables

LENGTH_BINS = 27  # log2 bins of document length in characters: <=16, <=32, ... <=2**30


def length_bin(text: str) -> int:
    return min(max(math.ceil(math.log2(max(len(text), 1))), 4), 30) - 4


def normalized_text(doc: Document) -> str:
    """Exact-dedup key: whitespace runs collapsed and case folded."""
    return " ".join(doc.text.split()).casefold()


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Split by a hash of the id: stable across runs and independent of document order and task count."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def unit_hash(doc_id: str, salt: str) -> float:
    """A deterministic number in [0, 1) per document: what fractional mixing weights sample by."""
    return int(hashlib.sha256(f"{salt}:{doc_id}".encode()).hexdigest()[:8], 16) / 2**32


def rank_shards(folder: DataFolder, rank: int, world_size: int, own: bool) -> list[str]:
    """A task's input: every world_size-th raw shard, or (own) the shards this rank wrote in an earlier pass."""
    shards = folder.list_files(glob_pattern=f"part-{rank:05d}-*.parquet" if own else "part-*.parquet")
    return shards if own else shards[rank::world_size]


class RawShardReader(PipelineStep):
    """Documents from our Parquet shards, one shard in memory at a time, each checked against the schema."""

    name = "raw shards"
    type = "📖 - READER"

    def __init__(self, folder: DataFolderLike, own_shards: bool = False):
        super().__init__()
        self.folder, self.own_shards = get_datafolder(folder), own_shards

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        schema = tables.CURATED_DOCS if self.own_shards else tables.RAW_DOCS
        for shard in rank_shards(self.folder, rank, world_size, self.own_shards):
            with self.folder.open(shard, "rb") as f:
                df = tables.read_shard(f, schema, where=self.folder.resolve_paths(shard))
            columns = [df[c].tolist() for c in tables.RAW_COLUMNS]  # columns as lists: far cheaper than itertuples
            for doc_id, text, source, domain, location in zip(*columns, strict=True):
                self.stat_update("documents")
                metadata = {"source": source, "domain": domain, "location": location}
                yield Document(text=text, id=doc_id, metadata=metadata)


class ShardWriter(PipelineStep):
    """Writes documents as Parquet shards part-<rank>-<n>.parquet checked against the curated schema, into
    <folder>/<split>/ when the documents carry a split. A shard closes at shard_rows documents or shard_bytes of
    text."""

    name = "shard writer"
    type = "💽 - WRITER"

    def __init__(self, folder: DataFolderLike, shard_rows: int = 50_000, shard_bytes: int = 64_000_000):
        super().__init__()
        self.folder, self.shard_rows, self.shard_bytes = get_datafolder(folder), shard_rows, shard_bytes

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        buffers: dict[str, list[dict]] = {}
        sizes: dict[str, int] = {}
        counts: dict[str, int] = {}

        def flush(split: str) -> None:
            n = counts.get(split, 0)
            shard = f"{split}/part-{rank:05d}-{n:05d}.parquet".lstrip("/")
            with self.folder.open(shard, "wb") as f:
                df = pd.DataFrame(buffers.pop(split))
                tables.write_shard(df, f, tables.CURATED_DOCS, where=self.folder.resolve_paths(shard))
            counts[split], sizes[split] = n + 1, 0

        for doc in data:
            split = doc.metadata.get("split", "")
            buffers.setdefault(split, []).append(
                {"id": doc.id, "text": doc.text, **{k: doc.metadata[k] for k in ("source", "domain", "location")}}
            )
            sizes[split] = sizes.get(split, 0) + len(doc.text)
            if len(buffers[split]) >= self.shard_rows or sizes[split] >= self.shard_bytes:
                flush(split)
            yield doc
        for split in list(buffers):
            flush(split)


class Measured(PipelineStep):
    """Runs `step` and records, per task, documents and bytes in and out, length histograms of both, documents it
    changed, and the first few it removed, into <report_dir>/<rank>.json (curate merges them).

    The wrapped step must stream: take a document, then yield it (maybe changed, maybe more than once) or not, before
    taking the next, as datatrove's filters, formatters and dedup filters do."""

    type = "📏 - MEASURE"

    def __init__(self, step: PipelineStep, name: str, report_dir: DataFolderLike, examples: int = 3):
        super().__init__()
        self.step, self.name, self.examples = step, name, examples
        self.report_dir = get_datafolder(report_dir)
        self.stats = step.stats  # datatrove's summary then shows the wrapped step's counts under our name

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        report = {
            "in": {"documents": 0, "bytes": 0},
            "out": {"documents": 0, "bytes": 0},
            "changed": 0,
            "lengths_in": [0] * LENGTH_BINS,
            "lengths_out": [0] * LENGTH_BINS,
            "removed_examples": [],
        }
        pending: list[tuple[Document, str]] = []  # the document being worked on, with its text as it came

        def settle() -> None:
            for doc, _ in pending:
                if len(report["removed_examples"]) < self.examples:
                    report["removed_examples"].append({"location": doc.metadata["location"], "text": doc.text[:300]})
            pending.clear()

        def feed() -> Iterable[Document]:
            for doc in data:
                settle()
                report["in"]["documents"] += 1
                report["in"]["bytes"] += len(doc.text.encode())
                report["lengths_in"][length_bin(doc.text)] += 1
                pending.append((doc, doc.text))
                yield doc

        for doc in self.step.run(feed(), rank, world_size):
            if pending and pending[-1][0] is doc:
                report["changed"] += doc.text is not pending[-1][1]
                pending.pop()
            report["out"]["documents"] += 1
            report["out"]["bytes"] += len(doc.text.encode())
            report["lengths_out"][length_bin(doc.text)] += 1
            yield doc
        settle()
        with self.report_dir.open(f"{rank:05d}.json", "w") as f:
            json.dump(report, f)


def alpha_fraction(text: str) -> float:
    return sum(map(str.isalpha, text)) / max(len(text), 1)


def longest_line(text: str) -> int:
    return max(map(len, text.split("\n")))


class FastTextLID(FT176LID):
    """datatrove's fastText language id, loading a local model instead of downloading lid.176."""

    def __init__(self, languages: list[str], model_path: str):
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class DocumentFilter(BaseFilter):
    """Keeps a document when low <= measure(text) <= high (measure: a module-level function, so the filter pickles
    into the processes tasks run in)."""

    def __init__(self, name: str, measure: Callable[[str], float], low: float = -math.inf, high: float = math.inf):
        super().__init__()
        self.name, self.measure, self.low, self.high = name, measure, low, high

    def filter(self, doc: Document) -> bool:
        return self.low <= self.measure(doc.text) <= self.high


class RegexWordTokenizer(WordTokenizer):
    """Words are runs of letters/digits or single other symbols; sentences end at . ! ? followed by a space or
    at a blank line. What datatrove's quality filters and MinHash shingles need, at regex speed."""

    WORDS = re.compile(r"\w+|[^\w\s]")
    SENTENCE_ENDS = re.compile(r"[.!?]+(?=\s)|\n\s*\n")

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORDS.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for end in self.SENTENCE_ENDS.finditer(text):
            if text[start : end.end()].strip():
                spans.append((start, end.end()))
            start = end.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for a, b in self.span_tokenize(text) if (s := text[a:b].strip())]


# Phone numbers written with separators (bare digit runs are far more often ids and constants than phones): after
# a country code, a one- to four-digit area code and two to four groups; else an area code (in parentheses, or of
# 2-4 digits) and two groups of 3-4 digits.
PHONE = (
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]\d{2,4}){2,4}"
    r"|(?:\(\d{1,4}\)\d{0,4}[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4})(?![\w-]|\.\d)"
)
# IPv6 candidates of at least three groups (Python's slices `a[1::2]` parse as IPv6), kept only if they parse and
# (with public_ips_only) are global, as datatrove checks IPv4s
IPV6 = r"(?<![\w:.])(?=(?:[0-9A-Fa-f]{1,4}:+){2}[0-9A-Fa-f])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:.])"
# Credentials by their issuers' formats, and private key blocks. One pattern each, each led by its literal prefix:
# Python's re scans for a leading literal fast, and tries an alternation (or a leading \b) at every position.
SECRETS = (
    r"AKIA[0-9A-Z]{16}\b",
    r"ASIA[0-9A-Z]{16}\b",
    r"gh[pousr]_[A-Za-z0-9]{36,}\b",
    r"github_pat_\w{22,}\b",
    r"sk-[A-Za-z0-9_-]{20,}",
    r"xox[abprs]-[A-Za-z0-9-]{10,}",
    r"AIza[0-9A-Za-z_-]{35}\b",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
)
# A long opaque value assigned to a secret-like name: the value goes, the name stays.
SECRET_ASSIGNMENT = r"(?i)((?:api_?key|secret|token|password)[\"']?\s*[:=]\s*[\"'])[A-Za-z0-9+/_.=-]{16,}(?=[\"'])"


class Replacer:
    """Regexes and their replacement (backreferences allowed), like datatrove's PIIReplacer."""

    def __init__(self, regexes: tuple[str, ...], replacement: str):
        self.regexes, self.replacement = [re.compile(r) for r in regexes], replacement

    def replace(self, text: str) -> str:
        for regex in self.regexes:
            text = regex.sub(self.replacement, text)
        return text


class PIIRedactor(PIIFormatter):
    """datatrove's PIIFormatter (emails, IPv4s), then IPv6s, phone numbers and secrets, which it does not know."""

    name = "🔏 PII"

    def __init__(self, emails: bool, ips: bool, public_ips_only: bool, phones: bool, secrets: bool):
        super().__init__(remove_emails=emails, remove_ips=ips, only_remove_public_ips=public_ips_only)
        public_ipv6 = functools.partial(public_ip_validator, public_only=public_ips_only)
        self.replacers = [PIIReplacer(IPV6, "2001:db8::1", validator=public_ipv6)] if ips else []  # documentation IP
        self.replacers += ([Replacer((PHONE,), "<PHONE>")] if phones else []) + (
            [Replacer(SECRETS, "<SECRET>"), Replacer((SECRET_ASSIGNMENT,), r"\1<SECRET>")] if secrets else []
        )

    def format(self, text: str) -> str:
        text = super().format(text)
        for replacer in self.replacers:
            text = replacer.replace(text)
        return text


WORD = re.compile(r"\w+")
# a different odd multiplier per position in the n-gram: the n-gram's hash is a position-weighted sum of its
# words' hashes (mod 2**64), computed for all n-grams of a document at once
POSITION_WEIGHTS = np.array([xxhash.xxh3_64_intdigest(str(k)) | 1 for k in range(64)], dtype=np.uint64)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of every n consecutive lower-cased words (letters and digits only: formatting does not hide a copy);
    xxhash, not hash(): the same in every task's process."""
    words = WORD.findall(text.lower())
    count = len(words) - n + 1
    if count < 1:
        return np.empty(0, dtype=np.uint64)
    word_hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            hashes += word_hashes[k : k + count] * POSITION_WEIGHTS[k % len(POSITION_WEIGHTS)]
    return hashes


def evaluation_texts(files: Iterable[str]) -> list[str]:
    """The text of each file: every string of every record for JSON Lines, the whole file otherwise."""

    def strings(value) -> Iterable[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                yield from strings(item)

    texts = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise io.DataError(f"curate.decontaminate.eval_files: {path} is not a file")
        if path.suffix not in (".jsonl", ".ndjson"):
            texts.append(path.read_text())
            continue
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            try:
                texts.extend([" ".join(strings(json.loads(line)))] if line.strip() else [])
            except json.JSONDecodeError as e:
                raise io.DataError(f"{path}:{line_no}: not JSON: {e}") from None
    return texts


class NGramDecontaminator(BaseFilter):
    """Drops a document that shares any n consecutive words with the evaluation text (GPT-3's 13-gram rule)."""

    name = "🧹 decontaminate"

    def __init__(self, eval_texts: list[str], n: int):
        super().__init__()
        self.n = n
        self.eval_ngrams = np.unique(
            np.concatenate([ngram_hashes(t, n) for t in eval_texts] or [np.empty(0, np.uint64)])
        )

    def filter(self, doc: Document) -> bool:
        return not np.isin(ngram_hashes(doc.text, self.n), self.eval_ngrams).any()


def load_scorer(spec: str, options: dict) -> Callable[[str], float]:
    """The scorer named "module:factory": factory(**options), a function scoring one text."""
    module, _, factory = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), factory)(**options)
    except (ImportError, AttributeError, TypeError) as e:
        raise io.DataError(f"curate.selection.scorer: cannot build {spec!r} with {options}: {e}") from None


class Selector(BaseFilter):
    """Keeps documents whose score lies in [min_score, max_score]; the scorer is built in each task's process."""

    name = "🎯 selection"

    def __init__(self, scorer: str, options: dict, min_score: float, max_score: float):
        super().__init__()
        self.spec, self.options, self.min_score, self.max_score = scorer, options, min_score, max_score
        self._score = None

    def filter(self, doc: Document) -> bool:
        if self._score is None:
            self._score = load_scorer(self.spec, self.options)
        return self.min_score <= self._score(doc.text) <= self.max_score


class SplitAndMix(PipelineStep):
    """Marks each document train or val by its id; a train document of a domain with weight w is written floor(w)
    times, once more with probability w - floor(w) (by a hash of its id: the same copies every run)."""

    name = "🔀 split and mix"

    def __init__(self, val_fraction: float, weights: dict[str, float]):
        super().__init__()
        self.val_fraction, self.weights = val_fraction, weights

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if is_val(doc.id, self.val_fraction):
                doc.metadata["split"] = "val"
                yield doc
                continue
            doc.metadata["split"] = "train"
            weight = self.weights.get(doc.metadata["domain"], 1.0)
            copies = int(weight) + (unit_hash(doc.id, "mix") < weight - int(weight))
            for _ in range(copies):
                yield doc


def merge_reports(report_dir: DataFolderLike, examples: int) -> dict:
    """The per-task reports of one step, summed; removed examples from the lowest ranks first."""
    folder, merged = get_datafolder(report_dir), {}
    for name in folder.list_files(glob_pattern="*.json"):
        with folder.open(name, "rt") as f:
            part = json.load(f)
        if not merged:
            merged = part
            continue
        for side in ("in", "out"):
            for key in ("documents", "bytes"):
                merged[side][key] += part[side][key]
        merged["changed"] += part["changed"]
        for key in ("lengths_in", "lengths_out"):
            merged[key] = list(np.add(merged[key], part[key]).tolist())
        merged["removed_examples"] = (merged["removed_examples"] + part["removed_examples"])[:examples]
    return merged
