"""Ingest, curate and tokenize of a generated corpus (--gb gigabytes of JSON Lines in --files files, prose-like
documents, 1 % exact and 1 % near duplicates planted), each run of a stage in its own process with the default
params but the paths and the settings compared; the peak resident memory of each run's whole process tree
(workers, Ray's processes included) sampled every 0.2 s. Three races, each in the same run:

- ingest, ingest.workers 2 against 1 (cold caches both);
- curate, curate.executor ray against local, curate.workers 2 both (Ray starts in the stage's process: the cost
  a user pays);
- tokenize encoding, tokenize.workers 2 against 1 (the BPE learns from --bpe-mb of text, the same both).

Each pair's outputs must be byte-identical. Where the time goes: each stage's phases (the "seconds" its run
returns, which its cost records).

    python bench/scale.py [--gb 1 --files 16 --tasks 2 --bpe-mb 100 --races ingest,curate,tokenize --keep DIR]

Ends with one JSON line: per race, each run's seconds, phases and peak RSS (MB), whether the outputs are
identical, and its ratio (the one-worker or local run's seconds / the other's; for tokenize, encoding seconds);
ratio (the worst race's ratio as a share of its bar); bar_met (ingest and tokenize >= 1.6, curate >= 0.8, outputs
identical, every peak under 2 GB). With --keep, a rerun reuses the corpus and the outputs of races not rerun
(tokenize encodes curate's local output).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

BAR_MB = 2048
BARS = {"ingest": 1.6, "curate": 0.8, "tokenize": 1.6}
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "river mill child teacher garden window letter market doctor train village winter bridge story song model data"
).split()


def generate(folder: Path, target_bytes: int, files: int, seed: int = 0) -> int:
    """Documents of 6-10 paragraphs of random sentences, dealt into `files` files in turn; every 100th repeats an
    earlier one exactly, every 100th (offset 50) with one word changed."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    outs = [(folder / f"part-{i:03d}.jsonl").open("w") for i in range(files)]
    written = docs = 0
    recent: list[str] = []
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
        outs[docs % files].write(line)
        written += len(line)
        docs += 1
    for f in outs:
        f.close()
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


def same_tree(a: Path, b: Path) -> bool:
    """Every file under a and b (names and bytes) the same."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--bpe-mb", type=int, default=100, help="the BPE's training sample, MB (both tokenize runs)")
    parser.add_argument("--races", type=lambda v: v.split(","), default=list(BARS), help="e.g. ingest,tokenize")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        race(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="scale-") as work:
            race(args, Path(work))


def race(args: argparse.Namespace, work: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    corpus = work / "corpus"
    if not corpus.exists():
        generated = generate(corpus, int(args.gb * 1e9), args.files)
        print(f"generated {generated} documents in {args.files} files", file=sys.stderr)
    corpus_bytes = sum(f.stat().st_size for f in corpus.iterdir())

    def run(stage: str, name: str, paths: dict, **settings) -> dict:
        """The stage in its own process, with these paths (under work) and settings of its section."""
        paths = {key: str(work / value) for key, value in paths.items()}
        paths |= {"reports": str(work / name), "plots": str(work / name), "checkpoints": str(work / name / "ck")}
        shutil.rmtree(work / name / "ck", ignore_errors=True)  # ingest's cache of files read: every run reads all
        out = work / name / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        code = (
            f"import dataclasses, json; from stages import {stage}; from stages.config import load_params, Source\n"
            f"from stages.tracking import NO_TRACKING\n"
            f"p = load_params({str(root / 'params.yaml')!r})\n"
            f"ing = dataclasses.replace(p.ingest, sources=(Source(path={str(corpus)!r}),))\n"
            f"p = dataclasses.replace(p, paths=dataclasses.replace(p.paths, **{paths!r}), ingest=ing)\n"
            f"p = dataclasses.replace(p, {stage}=dataclasses.replace(p.{stage}, **{settings!r}))\n"
            f"open({str(out)!r}, 'w').write(json.dumps({stage}.run(p, NO_TRACKING)))\n"
        )
        figures = run_stage(code, root)
        metrics = json.loads(out.read_text())
        figures["phases_s"] = metrics.get("seconds", {})
        print(name, figures, file=sys.stderr)
        return figures | {"metrics": metrics}

    curate_settings = {"tasks": args.tasks, "workers": 2}
    tokenize_settings = {"train_sample_bytes": args.bpe_mb * 10**6}
    settings = {  # stage: its two runs, each (name, paths, settings)
        "ingest": [(f"workers_{w}", {"raw": f"raw-{w}"}, {"workers": w}) for w in (1, 2)],
        "curate": [
            (e, {"raw": "raw-2", "curated": f"curated-{e}"}, curate_settings | {"executor": e})
            for e in ("local", "ray")
        ],
        "tokenize": [
            (f"workers_{w}", {"curated": "curated-local", "tokens": f"tokens-{w}"}, tokenize_settings | {"workers": w})
            for w in (1, 2)
        ],
    }
    files = len(list(corpus.iterdir()))
    figures: dict = {"gb": round(corpus_bytes / 1e9, 3), "files": files, "tasks": args.tasks, "bpe_mb": args.bpe_mb}
    for stage in args.races:
        (name_a, paths_a, set_a), (name_b, paths_b, set_b) = settings[stage]
        a, b = run(stage, f"{stage}-{name_a}", paths_a, **set_a), run(stage, f"{stage}-{name_b}", paths_b, **set_b)
        timed = (lambda r: r["phases_s"]["encode"]) if stage == "tokenize" else (lambda r: r["seconds"])
        output = "tokens" if stage == "tokenize" else "raw" if stage == "ingest" else "curated"
        figures[stage] = {
            name_a: {k: v for k, v in a.items() if k != "metrics"},
            name_b: {k: v for k, v in b.items() if k != "metrics"},
            "identical": same_tree(work / paths_a[output], work / paths_b[output]),
            "ratio": round(timed(a) / timed(b), 3),
        }
    done = [figures[s] for s in args.races]
    figures["ratio"] = round(min(figures[s]["ratio"] / BARS[s] for s in args.races), 3)  # the worst, of its bar
    figures["bar_met"] = all(figures[s]["ratio"] >= BARS[s] and figures[s]["identical"] for s in args.races) and all(
        r["peak_rss_mb"] < BAR_MB for race in done for r in race.values() if isinstance(r, dict)
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
