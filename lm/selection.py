"""Scorers for curate's selection hook (`curate.selection.scorer: "lm.selection:bits_per_byte"`): perplexity-based
data selection with a reference model, as CCNet ranks web text by a model trained on high-quality text."""

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lm import model_dir as model_files


def bits_per_byte(model_dir: str, max_tokens: int = 1024) -> Callable[[str], float]:
    """A function scoring a text by the model's bits per UTF-8 byte on its first max_tokens tokens (lower: more
    like what the model was trained on). model_dir: any model directory this pipeline writes."""
    path = Path(model_dir)
    model = model_files.load(path)
    tokenizer = Tokenizer.from_file(str(path / model_files.TOKENIZER))
    eos = 0  # tokenize puts the EOS token at id 0
    block = model.config.block_size

    @torch.no_grad()
    def score(text: str) -> float:
        encoding = tokenizer.encode(text)
        ids = [eos, *encoding.ids[:max_tokens]]
        scored_chars = encoding.offsets[min(max_tokens, len(encoding.ids)) - 1][1] if encoding.ids else 0
        nats = 0.0
        for start in range(0, len(ids) - 1, block):
            window = torch.tensor(ids[start : start + block + 1])
            logits = model(window[None, :-1])
            nats += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
        return nats / math.log(2) / max(len(text[:scored_chars].encode()), 1)

    return score
