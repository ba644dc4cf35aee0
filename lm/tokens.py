"""The token files: what the tokenize stage writes and every later stage reads. A folder holds tokenizer.json,
each split's shards <split>-00000.bin, <split>-00001.bin, ... (token ids, flat, EOS after every document; one per
curated shard, in order) and meta.json: vocab_size, eos_token, eos_id, dtype, special_tokens, and per split its
counts and the index of its shards ({"file", "tokens", "domains"} each, in stream order; "domains": [first token,
domain] wherever the documents' domain changes, so a position's domain is known without reading documents)."""

import bisect
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lm import io

META, TOKENIZER = "meta.json", "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_meta(tokens_dir: str | Path) -> dict:
    return io.read_json(Path(tokens_dir) / META)


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class TokenStream:
    """A split's shards as one sequence of token ids: len() and slices (step 1, which may span shards) and single
    positions, as of one flat array."""

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype):
        self.shards, self.dtype = [s for s in shards if len(s)], np.dtype(dtype)
        self.ends = list(itertools.accumulate(len(s) for s in self.shards))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, key: int | slice) -> np.ndarray | np.integer:
        if not isinstance(key, slice):
            position = range(len(self))[key]
            return self[position : position + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("token streams are sliced with step 1")
        if stop <= start:
            return np.empty(0, self.dtype)
        first, last = bisect.bisect_right(self.ends, start), bisect.bisect_left(self.ends, stop)
        parts = []
        for i in range(first, last + 1):
            offset = self.ends[i] - len(self.shards[i])
            parts.append(self.shards[i][max(start - offset, 0) : stop - offset])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class DomainRuns(NamedTuple):
    """A split's domains along its token stream: domains[i] from starts[i] to the next start."""

    starts: np.ndarray
    domains: list[str]

    def at(self, positions: np.ndarray) -> list[str]:
        """The domain of each stream position ("" for token files written before domains were recorded)."""
        if not self.domains:
            return [""] * len(positions)
        return [self.domains[i] for i in np.searchsorted(self.starts, positions, side="right") - 1]

    def spans(self, domain: str, end: int) -> list[tuple[int, int]]:
        """The domain's [start, stop) spans of the stream's first `end` positions."""
        stops = [*self.starts[1:], end]
        return [
            (a, min(b, end))
            for a, b, d in zip(self.starts, stops, self.domains, strict=True)
            if d == domain and a < end
        ]


def domain_runs(tokens_dir: str | Path, split: str) -> DomainRuns:
    """The split's domain runs over its whole stream, its shards' runs offset and merged."""
    starts, domains, offset = [], [], 0
    for entry in token_meta(tokens_dir)["splits"][split]["shards"]:
        for start, domain in entry.get("domains", []):
            if not domains or domains[-1] != domain:
                starts.append(offset + start)
                domains.append(domain)
        offset += entry["tokens"]
    return DomainRuns(np.asarray(starts, dtype=np.int64), domains)


def load_tokens(tokens_dir: str | Path, split: str) -> TokenStream:
    """A split's token ids, its shards memory-mapped in the order of meta.json's index; a shard whose size is not
    what the index says fails here, naming it."""
    meta = token_meta(tokens_dir)
    dtype = np.dtype(meta["dtype"])
    shards = []
    for entry in meta["splits"][split]["shards"]:
        path = Path(tokens_dir) / entry["file"]
        expected = entry["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise io.DataError(
                f"{path}: {found}, but {META} indexes {entry['tokens']} {dtype.name} tokens ({expected} bytes); "
                "re-run the tokenize stage (dvc repro tokenize)"
            )
        shards.append(np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype))
    return TokenStream(shards, dtype)


def save_split(tokens_dir: str | Path, split: str, shards: list[np.ndarray]) -> list[dict]:
    """Write arrays of token ids as a split's shard files; returns their index entries for meta.json."""
    index = []
    for i, ids in enumerate(shards):
        ids.tofile(Path(tokens_dir) / shard_file(split, i))
        index.append({"file": shard_file(split, i), "tokens": len(ids)})
    return index
