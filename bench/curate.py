"""Documents/s of our curate stage (stages.curate.run) against the equivalent datatrove pipeline run with
LocalPipelineExecutor on the same raw shards with the same filters, and each block our code replaces against the
datatrove block it replaces.

    python bench/curate.py [--raw data/raw --runs 3 --workers 1]

Whole pipeline: the reference is datatrove's own ParquetReader, ExactDedup (3 passes), the same length/alpha/line
filters as LambdaFilters, PIIFormatter + our phone/secret patterns (datatrove has none: our PIIRedactor is its
PIIFormatter plus those), our decontamination (datatrove's reads lighteval tasks from the hub), MinHash (4 passes)
with the same word splitter, ParquetWriter. Ours adds the per-step reports, the pandera checks and the train/val
split. Blocks: reading and writing shards (ours check the pandera schema), word splitting (ours: a regex;
datatrove's English default: spaCy, on a 2 MB sample).
Medians of --runs, alternating. Ends with one JSON line: the figures, ratio (ours / datatrove, whole pipeline) and
bar_met (whole >= 0.95 and every block >= 1.0).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.dedup import MinhashDedupSignature  # noqa: E402
from datatrove.pipeline.dedup.exact_dedup import (  # noqa: E402
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402
from datatrove.pipeline.formatters import PIIFormatter  # noqa: E402
from datatrove.pipeline.readers import ParquetReader  # noqa: E402
from datatrove.pipeline.writers import ParquetWriter  # noqa: E402
from datatrove.utils.word_tokenizers import load_word_tokenizer  # noqa: E402

from lm import tables  # noqa: E402
from lm.curation import (  # noqa: E402
    NGramDecontaminator,
    PIIRedactor,
    RawShardReader,
    RegexWordTokenizer,
    ShardWriter,
    evaluation_texts,
    normalized_text,
)
from stages import curate  # noqa: E402
from stages.config import Paths, load_params  # noqa: E402
from stages.tracking import NO_TRACKING  # noqa: E402

WHOLE_BAR, BLOCK_BAR = 0.95, 1.0


def datatrove_reference(cfg, raw: str, work: str, workers: int) -> None:
    """The default curate steps as a plain datatrove pipeline, in the same passes."""

    def run(pipeline, tasks=cfg.tasks):
        LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            skip_completed=False,
            logging_dir=f"{work}/logs/{time.perf_counter_ns()}",
        ).run()

    def reader(folder):
        return ParquetReader(folder, glob_pattern="*.parquet", id_key="id")

    exact = ExactDedupConfig(normalized_text)
    run([reader(raw), ExactDedupSignature(f"{work}/exact/sigs", exact)])
    run([ExactFindDedups(f"{work}/exact/sigs", f"{work}/exact/dups", exact)], tasks=1)
    run(
        [
            reader(raw),
            ExactDedupFilter(f"{work}/exact/dups", exact),
            *(LambdaFilter(ours.filter) for _, ours in curate.basic_filters(cfg)),
            PIIFormatter(),
            PIIRedactor(emails=False, ips=False, public_ips_only=True, phones=True, secrets=True),
            NGramDecontaminator(evaluation_texts(cfg.decontaminate.eval_files), cfg.decontaminate.ngram),
            ParquetWriter(f"{work}/filtered"),
        ]
    )
    bands, rows = curate.lsh_bands_rows(cfg.near_dedup)
    minhash = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=bands, hashes_per_bucket=rows)
    near = f"{work}/minhash"
    run([reader(f"{work}/filtered"), MinhashDedupSignature(f"{near}/sigs", minhash, curate.word_splitter(cfg))])
    run([MinhashDedupBuckets(f"{near}/sigs", f"{near}/buckets", config=minhash)], tasks=bands)
    run([MinhashDedupCluster(f"{near}/buckets", f"{near}/remove", config=minhash)], tasks=1)
    run([reader(f"{work}/filtered"), MinhashDedupFilter(f"{near}/remove"), ParquetWriter(f"{work}/out")])


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def count(step, data=None) -> int:
    """Run one datatrove step over data (a reader: over nothing) to the end."""
    return sum(1 for _ in step.run(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    params = load_params()
    cfg = dataclasses.replace(params.curate, workers=args.workers)
    docs = sum(len(df) for df in tables.iter_shards(args.raw, tables.RAW_DOCS, columns=["id"]))
    raw_docs = list(RawShardReader(args.raw).run())
    texts, ids = [d.text for d in raw_docs], [d.id for d in raw_docs]
    sample, size = [], 0
    for text in texts:  # spaCy is slow: a ~2 MB sample for the word splitting block
        sample.append(text)
        size += len(text)
        if size > 2_000_000:
            break
    spacy_words, regex_words = load_word_tokenizer("en"), RegexWordTokenizer()
    spacy_words.word_tokenize("warm up")  # spaCy's load is not what is measured
    times = {
        k: []
        for k in (
            "ours",
            "datatrove",
            "read_ours",
            "read_datatrove",
            "write_ours",
            "write_datatrove",
            "words_ours",
            "words_datatrove",
        )
    }
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            paths = Paths(raw=args.raw, curated=f"{tmp}/ours/curated", reports=f"{tmp}/ours", plots=f"{tmp}/ours")
            times["ours"].append(timed(curate.run, dataclasses.replace(params, curate=cfg, paths=paths), NO_TRACKING))
            times["datatrove"].append(timed(datatrove_reference, cfg, args.raw, f"{tmp}/dt", args.workers))
            times["read_ours"].append(timed(count, RawShardReader(args.raw)))
            times["read_datatrove"].append(timed(count, ParquetReader(args.raw, glob_pattern="*.parquet", id_key="id")))
            batch = [
                Document(text=t, id=doc_id, metadata={"source": "s", "domain": "d", "location": "l"})
                for doc_id, t in zip(ids, texts, strict=True)
            ]
            times["write_ours"].append(timed(count, ShardWriter(f"{tmp}/w1"), iter(batch)))
            times["write_datatrove"].append(timed(count, ParquetWriter(f"{tmp}/w2"), iter(batch)))
        times["words_ours"].append(timed(lambda: [regex_words.word_tokenize(t) for t in sample]))
        times["words_datatrove"].append(timed(lambda: [spacy_words.word_tokenize(t) for t in sample]))
    median = {k: statistics.median(v) for k, v in times.items()}
    blocks = {b: median[f"{b}_datatrove"] / median[f"{b}_ours"] for b in ("read", "write", "words")}
    ratio = median["datatrove"] / median["ours"]
    figures = {
        "documents": docs,
        "workers": args.workers,
        "ours_docs_per_s": round(docs / median["ours"], 1),
        "datatrove_docs_per_s": round(docs / median["datatrove"], 1),
        "block_ratios": {b: round(r, 3) for b, r in blocks.items()},
        "seconds": {k: round(v, 3) for k, v in median.items()},
        "ratio": round(ratio, 3),
        "bar_met": ratio >= WHOLE_BAR and all(r >= BLOCK_BAR for r in blocks.values()),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
