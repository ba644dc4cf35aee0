"""Ingest, curate and tokenize of a generated corpus (--gb gigabytes of JSON Lines in --files files, prose-like
documents, 1 % exact and 1 % near duplicates planted), each run of a stage as a user runs it: `python -m
stages.<stage>` as a whole process, MLflow tracking on, in a workspace of its own with the default params but the
paths and the settings compared. Each run's seconds are the whole process's; its peak memory (of the whole
process tree: workers, Ray's processes included) and its phases are what the stage's cost ledger recorded.
Three races, each in the same run:

- ingest, ingest.workers 2 against 1 (cold caches both);
- curate, curate.executor ray against local, curate.workers 2 both. The Ray run joins a cluster this script starts
  first (`ray start --head` on 127.0.0.1 with --tasks CPUs, as the README's Cluster compute section does), and the
  cluster's processes (its daemons and the workers that run the tasks) are measured apart from the stage's tree;
  with `--ray stage` the stage starts Ray itself, its daemons in its tree (the cost a user without a cluster pays);
- tokenize encoding, tokenize.workers 2 against 1 (the BPE learns from --bpe-mb of text, the same both).

Each pair's outputs must be byte-identical. Where the time goes: each stage's phases (the "seconds" its run
returns, which its cost records).

    python bench/scale.py [--gb 1 --files 16 --tasks 2 --bpe-mb 100 --races ingest,curate,tokenize --ray cluster
                           --repeats 1 --keep DIR]

With --repeats N, each race runs its pair N times in turn and its ratio is the median of the pairs' ratios (each
listed), so a phase of a noisy host does not decide it.

Ends with one JSON line: per race, each run's seconds, phases and peak RSS (MB; for Ray on a cluster, also the
cluster's peak, sampled every half second while the stage runs; with --repeats, the last pair's), whether the
outputs are identical, and its ratio (the one-worker or local run's seconds / the other's; for tokenize, encoding
seconds); ratio (the worst race's ratio as a share of its bar); bar_met (ingest and tokenize >= 1.6, curate >= 0.8,
outputs identical, every peak under 2 GB). With --keep, a rerun reuses the corpus and the outputs of races not rerun
(tokenize encodes curate's local output).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import yaml  # noqa: E402
from pretrain import ENV, ROOT, timed, tracked_workspace  # noqa: E402

from flows.server import free_port  # noqa: E402
from lm import io  # noqa: E402
from stages.cost import COST_DIR  # noqa: E402

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


@contextlib.contextmanager
def ray_cluster(cpus: int):
    """`ray start --head` on 127.0.0.1 with `cpus` CPUs (a one-machine cluster, token auth off, as tests/test_cluster.py
    starts it; the stage's process is told the same); yields its address and its temp folder, which every one of
    its processes names on its command line or descends from one that does."""
    ENV.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
    ray, temp, port = Path(sys.executable).parent / "ray", tempfile.mkdtemp(prefix="ray-"), free_port()
    head = [ray, "start", "--head", "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false"]
    subprocess.run([*head, "--disable-usage-stats", "--temp-dir", temp], env=ENV, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        subprocess.run([ray, "stop", "--force"], env=ENV, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def peak_rss(marker: str):
    """The peak, while the with-block runs, of the summed RSS of the processes whose command line holds `marker`
    and of their descendants (sampled every half second); yields a dict that holds it, in MB, afterwards."""
    peak, done = {"mb": 0.0}, threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            tree = {}
            for root in psutil.process_iter(["cmdline"]):
                if marker in " ".join(root.info["cmdline"] or []):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # ended since listed
                        tree |= {p.pid: p for p in [root, *root.children(recursive=True)]}
            rss = 0
            for process in tree.values():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss += process.memory_info().rss
            peak["mb"] = max(peak["mb"], rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


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
    parser.add_argument("--ray", choices=("cluster", "stage"), default="cluster", help="who starts Ray (above)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs per race; its ratio is their median")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        race(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="scale-") as work:
            race(args, Path(work))


def race(args: argparse.Namespace, work: Path) -> None:
    corpus = work / "corpus"
    if not corpus.exists():
        generated = generate(corpus, int(args.gb * 1e9), args.files)
        print(f"generated {generated} documents in {args.files} files", file=sys.stderr)
    corpus_bytes = sum(f.stat().st_size for f in corpus.iterdir())

    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    decontaminate = defaults["curate"]["decontaminate"]  # its evaluation text, read where the repo has it
    decontaminate["eval_files"] = [str(ROOT / f) for f in decontaminate["eval_files"]]

    def run(stage: str, name: str, paths: dict, cluster: str | None = None, **settings) -> dict:
        """The stage's command in a workspace of its own (work/name), with these paths (under work) and settings
        of its section; with `cluster` (a Ray cluster's temp folder), that cluster's peak RSS too."""
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)  # ingest's cache of files read too: every run reads all
        tree = copy.deepcopy(defaults)
        tree["paths"] |= {key: str(work / value) for key, value in paths.items()}
        tree["ingest"]["sources"] = [{"path": str(corpus), "name": "generated", "domain": "prose"}]
        tree[stage] |= settings
        tracked_workspace(folder, tree)
        with peak_rss(cluster) if cluster else contextlib.nullcontext() as cluster_peak:
            seconds, _ = timed([sys.executable, "-m", "stages", stage], folder)
        spent = io.read_json(folder / tree["paths"]["metrics"] / COST_DIR / f"{stage}.json")
        figures = {"seconds": round(seconds, 1), "peak_rss_mb": round(spent["peak_rss_mb"])}
        if cluster_peak:
            figures["cluster_peak_rss_mb"] = round(cluster_peak["mb"])
        figures["phases_s"] = spent.get("phases_s", {})
        print(name, figures, file=sys.stderr)
        return figures

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
        raced = (lambda r: r["phases_s"]["encode"]) if stage == "tokenize" else (lambda r: r["seconds"])
        ratios = []
        for _ in range(args.repeats):  # pairs in turn, so the host's slow phases fall on both sides
            a = run(stage, f"{stage}-{name_a}", paths_a, **set_a)
            if stage == "curate" and args.ray == "cluster":  # started after the local run: no idle daemons beside it
                with ray_cluster(curate_settings["workers"]) as (address, temp):
                    b = run(stage, f"{stage}-{name_b}", paths_b, temp, **set_b | {"ray": {"address": address}})
            else:
                b = run(stage, f"{stage}-{name_b}", paths_b, **set_b)
            ratios.append(round(raced(a) / raced(b), 3))
        output = "tokens" if stage == "tokenize" else "raw" if stage == "ingest" else "curated"
        figures[stage] = {
            name_a: a,
            name_b: b,
            "identical": same_tree(work / paths_a[output], work / paths_b[output]),
            "ratio": statistics.median(ratios),
        } | ({"ratios": ratios} if args.repeats > 1 else {})
    done = [figures[s] for s in args.races]
    figures["ratio"] = round(min(figures[s]["ratio"] / BARS[s] for s in args.races), 3)  # the worst, of its bar
    figures["bar_met"] = all(figures[s]["ratio"] >= BARS[s] and figures[s]["identical"] for s in args.races) and all(
        r["peak_rss_mb"] < BAR_MB for race in done for r in race.values() if isinstance(r, dict)
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
