"""curate's datatrove pipeline: each step on planted data, the near-dedup's precision and recall, scale-out."""

import dataclasses
import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lm import io, tables
from lm.curation import PIIRedactor, RegexWordTokenizer, is_val
from stages import curate
from stages.config import ConfigError, CurateConfig, Paths, parse_params
from stages.tracking import NO_TRACKING

# a vocabulary wide enough that random texts share few 5-grams; letters only (MinHash normalizes digits away)
WORDS = sorted({"".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=6)) for i in range(2000)})
CONTENT = (
    "river mill child teacher garden window letter market doctor train village winter bridge story song watched "
    "found carried painted visited followed opened remembered described repaired noticed old quiet bright small "
    "distant famous broken early green careful sudden warm"
).split()
STOP = "the and of to a in was it that with for on".split()


def prose(rng: random.Random, sentences: int = 30) -> str:
    """English-like text: stop words, punctuation, paragraphs, no repeated phrases: what Gopher, C4 and FineWeb
    keep."""

    def sentence() -> str:
        words = [rng.choice(STOP if rng.random() < 0.4 else CONTENT) for _ in range(rng.randint(8, 16))]
        return " ".join(words).capitalize() + "."

    return "\n\n".join(" ".join(sentence() for _ in range(5)) for _ in range(sentences // 5))


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_raw(folder: Path, texts: list[str], domains: list[str] | None = None, shards: int = 1) -> Path:
    df = pd.DataFrame(
        {
            "id": [doc_id(t) for t in texts],
            "text": texts,
            "source": "test",
            "domain": domains or ["prose"] * len(texts),
            "location": [f"doc{i}" for i in range(len(texts))],
        }
    )
    tables.write_shards(df, folder, tables.RAW_DOCS, shard_rows=-(-len(df) // shards))
    return folder


def run(tmp: Path, texts: list[str], domains=None, shards: int = 1, **overrides) -> tuple[dict, pd.DataFrame]:
    """curate.run on these texts; returns its metrics and every curated document (train and val)."""
    defaults = {"min_chars": 1, "min_alpha_fraction": 0.0, "val_fraction": 0.2}
    params = parse_params({"curate": defaults | overrides})
    paths = Paths(
        raw=str(write_raw(tmp / "raw", texts, domains, shards)),
        curated=str(tmp / "curated"),
        reports=str(tmp / "reports"),
        plots=str(tmp / "plots"),
    )
    metrics = curate.run(dataclasses.replace(params, paths=paths), NO_TRACKING)
    assert "filters" in metrics.pop("seconds"), "each pass's wall time (varies: left out of what tests compare)"
    docs = pd.concat(
        [
            tables.read_shards(tmp / "curated" / split, tables.CURATED_DOCS).assign(split=split)
            for split in ("train", "val")
        ]
    )
    return metrics, docs


def random_doc(rng: random.Random, words: int = 120) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def edit(rng: random.Random, text: str, fraction: float) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def shingles(text: str, n: int) -> set:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def near_dedup_precision_recall(tmp: Path, edits: list[float], labels: list[bool], **near) -> tuple[float, float]:
    """300 random originals; 150 of them get a copy with a fraction of words replaced (drawn from edits), a near
    duplicate when labels says so. Precision and recall of the copies the stage removes."""
    rng = random.Random(0)
    originals = [random_doc(rng) for _ in range(300)]
    drawn = [rng.randrange(len(edits)) for _ in range(150)]
    copies = [edit(rng, originals[i], edits[k]) for i, k in enumerate(drawn)]
    truth = {doc_id(c): labels[k] for c, k in zip(copies, drawn, strict=True)}
    _, docs = run(
        tmp,
        originals + copies,
        exact_dedup=False,
        pii={"enabled": False},
        decontaminate={"enabled": False},
        val_fraction=0.01,
        near_dedup=near,
    )
    kept = set(docs["id"])
    assert {doc_id(o) for o in originals} <= kept, "an original was dropped: its copy is later in the stream"
    removed = {i for i in truth if i not in kept}
    should = {i for i, dup in truth.items() if dup}
    return len(removed & should) / max(len(removed), 1), len(removed & should) / len(should)


def test_near_dedup_precision_and_recall_on_planted_near_duplicates(tmp_path):
    """Copies with 1 or 2 % of words replaced (Jaccard of 5-word shingles 0.92, 0.84) are planted duplicates;
    copies with 20-50 % replaced (Jaccard <= 0.46) are related documents that must stay."""
    edits, labels = [0.01, 0.02, 0.2, 0.3, 0.5], [True] * 2 + [False] * 3
    precision, recall = near_dedup_precision_recall(tmp_path, edits, labels)
    print(f"near-dedup on planted copies: precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.97 and recall >= 0.9
    assert curate.lsh_bands_rows(CurateConfig().near_dedup) == (12, 9)


def test_lsh_bands_and_rows_follow_the_threshold():
    low = curate.lsh_bands_rows(CurateConfig().near_dedup.__class__(threshold=0.5))
    high = curate.lsh_bands_rows(CurateConfig().near_dedup.__class__(threshold=0.9))
    midpoint = lambda b, r: (1 / b) ** (1 / r)  # noqa: E731
    assert midpoint(*low) < 0.6 < 0.85 < midpoint(*high)
    assert curate.lsh_bands_rows(CurateConfig().near_dedup.__class__(bands=14, rows=8)) == (14, 8)


def test_scale_out_two_workers_write_what_one_worker_writes(tmp_path):
    rng = random.Random(1)
    texts = [random_doc(rng) for _ in range(60)]
    texts += [edit(rng, t, 0.01) for t in texts[:10]] + [t.upper() for t in texts[10:15]]
    outputs = {}
    for workers in (1, 2):
        metrics, docs = run(tmp_path / f"w{workers}", texts, shards=4, tasks=3, workers=workers)
        files = sorted((tmp_path / f"w{workers}" / "curated").rglob("*.parquet"))
        outputs[workers] = (metrics, [(f.relative_to(tmp_path / f"w{workers}"), f.read_bytes()) for f in files])
    assert outputs[1] == outputs[2]
    metrics, files = outputs[2]
    assert len({name.name.split("-")[1] for name, _ in files}) == 3, "three tasks wrote shards"
    assert (
        metrics["steps"]["exact_dedup"]["out"]["documents"] == 70
        and metrics["train"]["documents"] + metrics["val"]["documents"] == 60
    )


def test_pii_redactor_replaces_each_kind_and_leaves_lookalikes():
    pii = PIIRedactor(emails=True, ips=True, public_ips_only=True, phones=True, secrets=True)
    text = (
        "Mail jane.doe@corp.com or call +1 415-555-0134 / (020) 7946 0958. Server 8.8.4.4, gateway 192.168.1.1, "
        "netmask 255.255.255.0, version 3.11.4, id 4155550134. key AKIAIOSFODNN7EXAMPLE token "
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789 and api_key = 'Zx9fQ2LmN8pR4sT6vW1y'"
    )
    out = pii.format(text)
    for secret in (
        "jane.doe@corp.com",
        "415-555-0134",
        "7946 0958",
        "8.8.4.4",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdef",
        "Zx9fQ2LmN8pR4sT6vW1y",
    ):
        assert secret not in out
    for kept in ("192.168.1.1", "255.255.255.0", "3.11.4", "4155550134"):
        assert kept in out
    assert out.count("<PHONE>") == 2 and out.count("<SECRET>") == 3 and "api_key = '<SECRET>'" in out


def test_pii_decontamination_and_mixing_in_the_stage(tmp_path):
    rng = random.Random(2)
    eval_file = tmp_path / "eval.jsonl"
    words = rng.choices(WORDS, k=40)  # a multiple-choice item: context, then the answer
    eval_file.write_text(f'{{"context": "{" ".join(words[:20])}", "choices": ["{" ".join(words[20:])}"]}}\n')
    leaked = random_doc(rng) + " " + " ".join(words[15:28]) + " " + random_doc(rng)  # 13 words of it
    near_miss = random_doc(rng) + " " + " ".join(words[15:27]) + " " + random_doc(rng)  # 12 words
    emails = random_doc(rng) + " write to someone@example.org today"
    code = [random_doc(rng) for _ in range(40)]
    prose = [random_doc(rng) for _ in range(40)]
    texts = [leaked, near_miss, emails, *code, *prose]
    domains = ["other"] * 3 + ["code"] * 40 + ["prose"] * 40  # other: weight 1
    metrics, docs = run(
        tmp_path,
        texts,
        domains,
        decontaminate={"ngram": 13, "eval_files": [str(eval_file)]},
        mixing_weights={"code": 2.0, "prose": 0.5},
    )
    ids = set(docs["id"])
    assert doc_id(leaked) not in ids and doc_id(near_miss) in ids
    assert (
        metrics["steps"]["decontaminate"]["out"]["documents"]
        == metrics["steps"]["decontaminate"]["in"]["documents"] - 1
    )
    redacted = docs[docs["text"].str.contains("write to")]["text"]
    assert len(redacted) >= 1 and "someone@example.org" not in redacted.iloc[0]
    report = io.read_json(tmp_path / "reports" / "curate.json")
    assert report["pii"]["changed"] == 1 and report["decontaminate"]["removed_examples"][0]["location"] == "doc0"
    train = docs[docs["split"] == "train"]
    code_train = [doc_id(t) for t in code if not is_val(doc_id(t), 0.2)]
    assert all((train["id"] == i).sum() == 2 for i in code_train), "weight 2: every code train document twice"
    prose_train = [doc_id(t) for t in prose if not is_val(doc_id(t), 0.2)]
    kept = sum(i in set(train["id"]) for i in prose_train)
    assert 0.2 * len(prose_train) < kept < 0.8 * len(prose_train), "weight 0.5: about half"
    assert not (docs[docs["split"] == "val"]["id"].duplicated()).any(), "val is never upsampled"
    steps = pd.read_csv(tmp_path / "plots" / "curate_steps.csv")
    assert steps["step"].iloc[0] == "input" and steps["documents"].iloc[0] == len(texts)


def test_quality_filters_remove_what_they_target(tmp_path):
    rng = random.Random(3)
    good = [prose(rng) for _ in range(30)]
    no_stop_words = " ".join(rng.choices(["alpha", "beta", "gamma", "delta"], k=200)) + "."
    repeated_lines = "\n".join(["The child and the teacher walked to the river with a letter."] * 40)
    lorem = prose(rng) + " Lorem ipsum dolor sit amet."
    short_lines = "\n".join(rng.choice(["ok", "yes", "no", "fine"]) for _ in range(100))
    texts = [*good, no_stop_words, repeated_lines, lorem, short_lines]
    on = {"enabled": True}
    metrics, docs = run(
        tmp_path,
        texts,
        gopher_quality=on,
        gopher_repetition=on,
        c4=on,
        fineweb=on,
        exact_dedup=False,
        near_dedup={"enabled": False},
    )
    report = io.read_json(tmp_path / "reports" / "curate.json")
    removed = {step: [e["location"] for e in report[step]["removed_examples"]] for step in report}
    n = len(good)
    assert f"doc{n}" in removed["gopher_quality"]  # no stop words
    assert f"doc{n + 1}" in removed["gopher_repetition"]
    assert f"doc{n + 2}" in removed["c4"]  # lorem ipsum
    assert f"doc{n + 3}" not in set(docs["location"])  # one-word lines
    assert set(docs["location"]) >= {f"doc{i}" for i in range(5)}, "ordinary prose passes every filter"
    assert metrics["steps"]["fineweb"]["out"]["documents"] <= metrics["steps"]["fineweb"]["in"]["documents"]


def test_a_bad_datatrove_option_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"curate\.c4\.options\.min_sentences; allowed: .*min_num_sentences"):
        run(tmp_path, [prose(random.Random(0))] * 3, c4={"enabled": True, "options": {"min_sentences": 2}})


def test_language_filter_with_a_local_fasttext_model(tmp_path):
    pytest.importorskip("fasttext")
    rng = random.Random(4)
    english = "the of and to in is that it was for on are with as his they be at one have this".split()
    french = "le de la et les des en un une du est pour que qui dans par sur pas plus avec".split()
    lines = [
        f"__label__{lang} " + " ".join(rng.choices(vocab, k=20))
        for _ in range(200)
        for lang, vocab in (("en", english), ("fr", french))
    ]
    (tmp_path / "lid.txt").write_text("\n".join(lines) + "\n")
    # trained in a fresh interpreter: once pandas is imported, fastText 0.9.2's training here ends in "Encountered
    # NaN" (softmax loss NaNs on a set this small anyway: hierarchical softmax)
    train = (
        f"import fasttext; fasttext.train_supervised({str(tmp_path / 'lid.txt')!r}, loss='hs', thread=1, verbose=0)"
        f".save_model({str(tmp_path / 'lid.bin')!r})"
    )
    subprocess.run([sys.executable, "-c", train], check=True)
    texts = [" ".join(rng.choices(english, k=60)) for _ in range(10)] + [" ".join(rng.choices(french, k=60))]
    _, docs = run(
        tmp_path,
        texts,
        language={"enabled": True, "languages": ["en"], "model_path": str(tmp_path / "lid.bin")},
        near_dedup={"enabled": False},
    )
    assert "doc10" not in set(docs["location"]) and len(docs) == 10
    with pytest.raises(io.DataError, match="curate.language.model_path: .*missing.bin is not a file"):
        run(tmp_path / "again", texts, language={"enabled": True, "model_path": str(tmp_path / "missing.bin")})


def test_selection_keeps_what_a_reference_model_finds_likely(tmp_path, pipeline):
    """lm.selection's bits-per-byte scorer with the tiny pipeline's pretrained model: in-domain prose scores
    lower than digit soup; a threshold between them keeps only the prose."""
    from lm.selection import bits_per_byte

    p, _ = pipeline
    score = bits_per_byte(p.paths.model("pretrain"), max_tokens=256)
    prose = list(tables.read_shards(Path(p.paths.curated) / "train", tables.CURATED_DOCS)["text"].iloc[:6])
    rng = random.Random(5)
    digits = [" ".join(str(rng.randint(0, 10**6)) for _ in range(200)) for _ in range(2)]
    assert max(map(score, prose)) < min(map(score, digits))
    threshold = (max(map(score, prose)) + min(map(score, digits))) / 2
    options = {"model_dir": p.paths.model("pretrain"), "max_tokens": 256}
    selection = {"scorer": "lm.selection:bits_per_byte", "options": options, "max_score": threshold}
    metrics, docs = run(tmp_path, prose + digits, selection=selection, val_fraction=0.5)
    assert set(docs["location"]) == {f"doc{i}" for i in range(6)}
    assert metrics["steps"]["selection"]["in"]["documents"] - metrics["steps"]["selection"]["out"]["documents"] == 2


def test_regex_word_tokenizer_splits_words_and_sentences():
    tok = RegexWordTokenizer()
    assert tok.word_tokenize("Hello, world! x_1 = 2.5") == ["Hello", ",", "world", "!", "x_1", "=", "2", ".", "5"]
    assert tok.sent_tokenize("One. Two?  Three\n\nFour") == ["One.", "Two?", "Three", "Four"]


def test_curate_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="curate.near_dedup.threshold must be in"):
        parse_params({"curate": {"near_dedup": {"threshold": 1.5}}})
    with pytest.raises(ConfigError, match="curate.language.model_path"):
        parse_params({"curate": {"language": {"enabled": True}}})
    with pytest.raises(ConfigError, match="curate.mixing_weights.code must be >= 0"):
        parse_params({"curate": {"mixing_weights": {"code": -1}}})
    with pytest.raises(ConfigError, match=r"curate.word_tokenizer: 'nltk' is not allowed"):
        parse_params({"curate": {"word_tokenizer": "nltk"}})
    assert dataclasses.replace(CurateConfig(), workers=4).workers == 4


def test_spacy_word_tokenizer_finds_the_same_near_duplicates(tmp_path):
    """datatrove's default word splitter (spaCy's blank English) against ours, on planted copies."""
    pytest.importorskip("spacy")
    rng = random.Random(6)
    texts = [random_doc(rng) for _ in range(30)]
    texts += [edit(rng, t, 0.01) for t in texts[:10]]
    kept = {}
    for splitter in ("regex", "spacy"):
        _, docs = run(tmp_path / splitter, texts, word_tokenizer=splitter, val_fraction=0.3)
        kept[splitter] = set(docs["location"])
    assert kept["regex"] == kept["spacy"] == {f"doc{i}" for i in range(30)}
