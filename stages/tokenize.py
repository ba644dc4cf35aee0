"""tokenize: train a byte-level BPE on the train split (at most tokenize.train_sample_bytes of it, drawn evenly),
encode both splits into flat token files.

Writes the token files of lm/tokens.py: tokenizer.json, train.bin and val.bin (uint16 or uint32, EOS after every
document) and meta.json. Metrics: vocabulary size, tokens, bytes and bytes per token of each split.
"""

import hashlib
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lm import io, tables
from lm.tokens import META, TOKENIZER, token_dtype
from stages import cli
from stages.config import Params, Paths, TokenizeConfig
from stages.tracking import Tracker

log = logging.getLogger("stages.tokenize")

SPLITS = ("train", "val")
ENCODE_BATCH = 1024


def split_texts(paths: Paths, split: str) -> Iterator[str]:
    """A split's documents in order, one shard in memory at a time."""
    for shard in tables.iter_shards(Path(paths.curated) / split, tables.CURATED_DOCS, columns=["text"]):
        yield from shard["text"]


def text_bytes(folder: Path) -> int:
    """The split's text bytes as its Parquet footers state them (uncompressed column size): no text is read."""
    total = 0
    for shard in sorted(folder.glob("part-*.parquet")):
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


def encode_to_file(tok: Tokenizer, texts: Iterator[str], eos_id: int, dtype: np.dtype, path: Path) -> dict:
    """Encode in batches (tokenizers spreads each over every core), EOS after each document, appending to
    `path` as it goes; returns the documents, tokens and UTF-8 bytes encoded."""
    counts = {"documents": 0, "tokens": 0, "bytes": 0}
    texts = iter(texts)
    started = time.perf_counter()
    with open(path, "wb") as f:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
            ids = np.fromiter(
                itertools.chain.from_iterable(itertools.chain(e.ids, (eos_id,)) for e in encodings), dtype=dtype
            )
            f.write(ids.tobytes())
            counts["documents"] += len(batch)
            counts["tokens"] += len(ids)
            counts["bytes"] += sum(len(t.encode()) for t in batch)
            rate = counts["tokens"] / (time.perf_counter() - started)
            done = counts["documents"], counts["tokens"]
            log.info("tokenize: %s %d documents, %d tokens, %.0f tokens/s", path.stem, *done, rate)
    return counts


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.tokenize, params.paths
    tok = train_tokenizer(training_sample(paths, cfg.train_sample_bytes), cfg)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(cfg.eos_token)
    dtype = token_dtype(vocab_size)
    meta = {"vocab_size": vocab_size, "eos_token": cfg.eos_token, "eos_id": eos_id, "dtype": dtype.name}
    meta |= {"special_tokens": [cfg.eos_token, *cfg.special_tokens], "splits": {}}
    with io.atomic_dir(paths.tokens) as out:
        tok.save(str(out / TOKENIZER))
        for split in SPLITS:
            counts = encode_to_file(tok, split_texts(paths, split), eos_id, dtype, out / f"{split}.bin")
            meta["splits"][split] = counts | {"bytes_per_token": counts["bytes"] / counts["tokens"]}
        io.write_json(out / META, meta)
    return {"vocab_size": vocab_size, "dtype": dtype.name, **meta["splits"]}


if __name__ == "__main__":
    cli.main(run)
