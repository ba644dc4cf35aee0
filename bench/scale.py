"""Ingest + curate of a generated corpus of --gb gigabytes (JSON Lines of prose-like documents, 1 % exact and 1 %
near duplicates planted), each stage in its own process with the default params but the paths; the peak resident
memory of each stage's whole process tree (datatrove's workers included) sampled every 0.2 s.

    python bench/scale.py [--gb 1 --tasks 2 --workers 2 --keep DIR]

Ends with one JSON line: seconds and peak RSS (MB) per stage, documents in and out, and bar_met (every peak under
2 GB).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

BAR_MB = 2048
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "river mill child teacher garden window letter market doctor train village winter bridge story song model data"
).split()


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Documents of 6-10 paragraphs of random sentences; every 100th repeats an earlier one exactly, every 100th
    (offset 50) with one word changed."""
    rng = random.Random(seed)
    written = docs = 0
    recent: list[str] = []
    with path.open("w") as f:
        while written < target_bytes:
            if docs % 100 == 99 and recent:
                text = rng.choice(recent)
            elif docs % 100 == 49 and recent:
                words = rng.choice(recent).split(" ")
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            else:
                paragraphs = [
                    " ".join(
                        " ".join(rng.choices(WORDS, k=rng.randint(8, 18))).capitalize() + "."
                        for _ in range(rng.randint(3, 6))
                    )
                    for _ in range(rng.randint(6, 10))
                ]
                text = "\n\n".join(paragraphs)
                recent = (recent + [text])[-50:]
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def run_stage(code: str, cwd: Path) -> dict:
    """Run python -c code; returns its seconds and the peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    stderr = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"stage failed:\n{stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = args.keep or Path(tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        generated = generate(corpus, int(args.gb * 1e9))
        print(f"generated {generated} documents, {corpus.stat().st_size / 1e9:.2f} GB", file=sys.stderr)
    paths = {"raw": str(work / "raw"), "curated": str(work / "curated"), "reports": str(work), "plots": str(work)}
    setup = (
        f"import dataclasses, json; from stages import ingest, curate; from stages.config import load_params, Source\n"
        f"from stages.tracking import NO_TRACKING\n"
        f"p = load_params({str(root / 'params.yaml')!r})\n"
        f"paths = dataclasses.replace(p.paths, **{paths!r})\n"
        f"ing = dataclasses.replace(p.ingest, sources=(Source(path={str(corpus)!r}),))\n"
        f"cur = dataclasses.replace(p.curate, tasks={args.tasks}, workers={args.workers})\n"
        f"p = dataclasses.replace(p, paths=paths, ingest=ing, curate=cur)\n"
    )
    figures = {"gb": round(corpus.stat().st_size / 1e9, 3), "tasks": args.tasks, "workers": args.workers}
    for stage, call in (("ingest", "ingest.run(p, NO_TRACKING)"), ("curate", "curate.run(p, NO_TRACKING)")):
        out = work / f"metrics-{stage}.json"
        figures[stage] = run_stage(setup + f"open({str(out)!r}, 'w').write(json.dumps({call}))", root)
        metrics = json.loads(out.read_text())
        figures[stage]["documents_out"] = (
            metrics["documents"] if stage == "ingest" else metrics["train"]["documents"] + metrics["val"]["documents"]
        )
        print(stage, figures[stage], file=sys.stderr)
    figures["bar_met"] = all(figures[s]["peak_rss_mb"] < BAR_MB for s in ("ingest", "curate"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
