"""tokenize: train a byte-level BPE on the train split, encode both splits into flat token files.

Inputs:  ${paths.curated}
Outputs: ${paths.tokens}/tokenizer.json, train.bin, val.bin (uint16 or uint32, EOS after every document), meta.json
Metrics: ${paths.metrics}/tokenize.json: vocabulary size, tokens, bytes and bytes per token of each split
"""

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stages import io, tables
from stages.cli import stage_main
from stages.config import Paths, TokenizeConfig

log = logging.getLogger("stages.tokenize")

SPLITS = ("train", "val")
ENCODE_BATCH = 1024


def train_tokenizer(texts: Iterator[str], cfg: TokenizeConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_to_file(tok: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype, path: Path) -> int:
    """Encode in parallel batches, EOS after each document; returns the token count."""
    n_tokens = 0
    with open(path, "wb") as f:
        for start in range(0, len(texts), ENCODE_BATCH):
            for enc in tok.encode_batch(texts[start : start + ENCODE_BATCH], add_special_tokens=False):
                ids = np.asarray(enc.ids + [eos_id], dtype=dtype)
                f.write(ids.tobytes())
                n_tokens += len(ids)
            log.info("tokenize: %s %d/%d documents", path.stem, min(start + ENCODE_BATCH, len(texts)), len(texts))
    return n_tokens


def load_tokens(tokens_dir: str | Path, split: str) -> np.memmap:
    meta = io.read_json(Path(tokens_dir) / "meta.json")
    return np.memmap(Path(tokens_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def run(cfg: TokenizeConfig, paths: Paths) -> dict:
    texts = {s: tables.read_shards(Path(paths.curated) / s, tables.CURATED_DOCS)["text"].tolist() for s in SPLITS}
    tok = train_tokenizer(iter(texts["train"]), cfg)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(cfg.eos_token)
    dtype = token_dtype(vocab_size)
    meta = {"vocab_size": vocab_size, "eos_token": cfg.eos_token, "eos_id": eos_id, "dtype": dtype.name, "splits": {}}
    with io.atomic_dir(paths.tokens) as out:
        tok.save(str(out / "tokenizer.json"))
        for split in SPLITS:
            n_tokens = encode_to_file(tok, texts[split], eos_id, dtype, out / f"{split}.bin")
            n_bytes = sum(len(t.encode()) for t in texts[split])
            meta["splits"][split] = {
                "documents": len(texts[split]),
                "tokens": n_tokens,
                "bytes": n_bytes,
                "bytes_per_token": n_bytes / n_tokens,
            }
        io.write_json(out / "meta.json", meta)
    return {"vocab_size": vocab_size, "dtype": dtype.name, **meta["splits"]}


def main() -> None:
    stage_main(
        "tokenize",
        lambda p, tracker: run(p.tokenize, p.paths),
        inputs=lambda p: [p.curated],
        artifacts=lambda p: [f"{p.tokens}/meta.json", f"{p.tokens}/tokenizer.json"],
    )


if __name__ == "__main__":
    main()
