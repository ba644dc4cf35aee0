"""The token files: what the tokenize stage writes and every later stage reads. A folder holds tokenizer.json,
<split>.bin (the split's token ids, flat, EOS after every document) and meta.json (vocab_size, eos_token, eos_id,
dtype, special_tokens, per-split counts)."""

from pathlib import Path

import numpy as np

from lm import io

META, TOKENIZER = "meta.json", "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_meta(tokens_dir: str | Path) -> dict:
    return io.read_json(Path(tokens_dir) / META)


def load_tokens(tokens_dir: str | Path, split: str) -> np.memmap:
    """A split's token ids, memory-mapped."""
    return np.memmap(Path(tokens_dir) / f"{split}.bin", dtype=token_meta(tokens_dir)["dtype"], mode="r")
