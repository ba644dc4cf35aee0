"""tokenize: train a byte-level BPE on the train split (at most tokenize.train_sample_bytes of it, drawn evenly),
encode both splits into sharded token files, each curated shard on one of tokenize.workers processes.

Writes the token files of lm/tokens.py: tokenizer.json, train-00000.bin ... and val-00000.bin ... (uint16 or
uint32, EOS after every document, one per curated shard) and meta.json with their index and each shard's domain
runs. Metrics: vocabulary size, shards, tokens, bytes, bytes per token and tokens per domain of each split.
"""

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lm import io, tables
from lm.tokens import META, TOKENIZER, shard_file, token_dtype
from lm.workers import Workers
from stages import cli, cost
from stages.config import Params, Paths, TokenizeConfig
from stages.tracking import Tracker

log = logging.getLogger("stages.tokenize")

SPLITS = ("train", "val")
ENCODE_BATCH = 1024


def text_bytes(folder: Path) -> int:
    """The split's text bytes as its Parquet footers state them (uncompressed column size): no text is read."""
    total = 0
    for shard in tables.list_shards(folder):
        meta = pq.ParquetFile(shard).metadata
        column = meta.schema.names.index("text")
        total += sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
    return total


def drawn(doc_id: str, fraction: float) -> bool:
    """A document's place in the sample: a hash of its id, so the same documents every run."""
    return int(hashlib.sha256(f"bpe:{doc_id}".encode()).hexdigest()[:8], 16) / 2**32 < fraction


def training_sample(paths: Paths, sample_bytes: int) -> Iterator[str]:
    """What the BPE learns its merges from: all train text when it holds at most sample_bytes (0: no bound), else
    documents drawn evenly across the split (by a hash of their id), about sample_bytes of them."""
    folder = Path(paths.curated) / "train"
    total = text_bytes(folder)
    fraction = 1.0 if not sample_bytes or total <= sample_bytes else sample_bytes / total
    log.info("tokenize: the BPE learns from %.0f%% of %d bytes of train text", 100 * fraction, total)
    for shard in tables.iter_shards(folder, tables.CURATED_DOCS, columns=["id", "text"]):
        for doc_id, text in zip(shard["id"], shard["text"], strict=True):
            if fraction == 1.0 or drawn(doc_id, fraction):
                yield text


def train_tokenizer(texts: Iterator[str], cfg: TokenizeConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, *cfg.special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_to_file(
    tok: Tokenizer, texts: Iterator[str], eos_id: int, dtype: np.dtype, path: Path, domains: Iterator[str] = ()
) -> dict:
    """Encode in batches (tokenizers spreads each over the process's cores), EOS after each document, appending to
    `path` as it goes; returns the documents, tokens and UTF-8 bytes encoded, and with each document's domain
    given, the domains' runs: [first token, domain] wherever the domain changes (lm/tokens.py)."""
    counts = {"documents": 0, "tokens": 0, "bytes": 0}
    texts, domains, runs = iter(texts), iter(domains), []
    with open(path, "wb") as f:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
            ids = np.fromiter(
                itertools.chain.from_iterable(itertools.chain(e.ids, (eos_id,)) for e in encodings), dtype=dtype
            )
            f.write(ids.tobytes())
            start = counts["tokens"]
            for encoding, domain in zip(
                encodings, itertools.islice(domains, len(batch)), strict=False
            ):  # () in benches
                if not runs or runs[-1][1] != domain:
                    runs.append([start, domain])
                start += len(encoding.ids) + 1
            counts["documents"] += len(batch)
            counts["tokens"] += len(ids)
            counts["bytes"] += sum(len(t.encode()) for t in batch)
    return counts | ({"domains": runs} if runs else {})


def encode_shard(tokenizer: str, shard: Path, eos_id: int, dtype: str, path: Path) -> dict:
    """One curated shard into one token file: the unit of work of tokenize.workers."""
    docs = tables.read_shard(shard, tables.CURATED_DOCS, columns=["text", "domain"])
    tok = Tokenizer.from_file(tokenizer)
    return encode_to_file(tok, iter(docs["text"]), eos_id, np.dtype(dtype), path, iter(docs["domain"]))


def share_cores(workers: int) -> None:
    """Each worker's tokenizers thread pool gets its share of the cores, not all of them."""
    os.environ["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def encode_split(shards: list[Path], out: Path, split: str, eos_id: int, dtype: str, pool: Workers) -> dict:
    """Every shard of a split into its own token file, on the pool's processes; the files, their index and counts
    do not depend on their number."""
    jobs = [(str(out / TOKENIZER), shard, eos_id, dtype, out / shard_file(split, i)) for i, shard in enumerate(shards)]
    started = time.perf_counter()
    totals = {"documents": 0, "tokens": 0, "bytes": 0}
    index = []
    by_domain = {}
    for job, counts in zip(jobs, pool.map(encode_shard, jobs), strict=True):
        index.append({"file": job[-1].name, "tokens": counts["tokens"], "domains": counts.get("domains", [])})
        totals.update({k: totals[k] + counts[k] for k in totals})
        ends = [start for start, _ in counts.get("domains", [])[1:]] + [counts["tokens"]]
        for (start, domain), end in zip(counts.get("domains", []), ends, strict=True):
            by_domain[domain] = by_domain.get(domain, 0) + end - start
        rate = totals["tokens"] / (time.perf_counter() - started)
        progress = split, len(index), len(jobs), totals["tokens"], rate
        log.info("tokenize: %s shard %d of %d, %d tokens, %.0f tokens/s", *progress)
    return totals | {"domain_tokens": dict(sorted(by_domain.items())), "shards": index}


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.tokenize, params.paths
    started = time.perf_counter()
    tok = train_tokenizer(training_sample(paths, cfg.train_sample_bytes), cfg)
    seconds = {"bpe": round(time.perf_counter() - started, 1)}
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(cfg.eos_token)
    dtype = token_dtype(vocab_size)
    meta = {"vocab_size": vocab_size, "eos_token": cfg.eos_token, "eos_id": eos_id, "dtype": dtype.name}
    meta |= {"special_tokens": [cfg.eos_token, *cfg.special_tokens], "splits": {}}
    metrics = {"vocab_size": vocab_size, "dtype": dtype.name}
    with io.atomic_dir(paths.tokens) as out, Workers(cfg.workers, share_cores) as pool:
        tok.save(str(out / TOKENIZER))
        started = time.perf_counter()
        for split in SPLITS:
            shards = tables.list_shards(Path(paths.curated) / split)
            counts = encode_split(shards, out, split, eos_id, dtype.name, pool)
            counts["bytes_per_token"] = counts["bytes"] / counts["tokens"]
            meta["splits"][split] = counts
            metrics[split] = {k: v for k, v in counts.items() if k != "shards"} | {"shards": len(shards)}
        seconds["encode"] = round(time.perf_counter() - started, 1)
        io.write_json(out / META, meta)
    return metrics | {cost.PHASES: seconds}


if __name__ == "__main__":
    cli.main(run)
