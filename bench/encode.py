"""Encoding throughput of our tokenize stage (stages.tokenize.encode_to_file: curated Parquet shards streamed in,
token file written out) against raw `tokenizers` `encode_batch` on the same texts already in memory (and, for
reference, `encode_batch_fast`, which ours calls: no character offsets, which token files never need).

    python bench/encode.py [--curated data/curated/train --tokenizer data/tokens/tokenizer.json --runs 3]

Defaults to the pipeline's own train split and tokenizer (run `make run` first). Both use the same tokenizer and
text in the same run; the median of --runs each. Ends with one JSON line: tokens/s of each, ratio (ours / raw)
and bar_met (ratio >= 0.9).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from lm import tables  # noqa: E402
from stages.tokenize import ENCODE_BATCH, encode_to_file  # noqa: E402

BAR = 0.9


def shard_texts(curated: Path):
    for shard in tables.iter_shards(curated, tables.CURATED_DOCS, columns=["text"]):
        yield from shard["text"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--curated", type=Path, default=Path("data/curated/train"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokens/tokenizer.json"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer))
    texts = list(shard_texts(args.curated))
    ours, raw, raw_fast = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            t0 = time.perf_counter()
            counts = encode_to_file(tok, shard_texts(args.curated), 0, np.dtype(np.uint16), Path(tmp) / "t.bin")
            ours.append(counts["tokens"] / (time.perf_counter() - t0))
            for encode, rates in ((tok.encode_batch, raw), (tok.encode_batch_fast, raw_fast)):
                t0 = time.perf_counter()
                n = sum(len(e.ids) + 1 for e in encode(texts, add_special_tokens=False))  # + EOS, as ours
                rates.append(n / (time.perf_counter() - t0))
    assert n == counts["tokens"], (n, counts["tokens"])
    ours_rate, raw_rate = statistics.median(ours), statistics.median(raw)
    ratio = ours_rate / raw_rate
    figures = {"documents": len(texts), "tokens": n, "batch": ENCODE_BATCH}
    figures |= {"ours_tokens_per_s": round(ours_rate), "raw_tokens_per_s": round(raw_rate)}
    figures["raw_fast_tokens_per_s"] = round(statistics.median(raw_fast))  # encode_batch_fast: what ours calls
    print(json.dumps(figures | {"ratio": round(ratio, 3), "bar_met": ratio >= BAR}))


if __name__ == "__main__":
    main()
