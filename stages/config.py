"""params.yaml -> frozen, strict, typed config: one class per section.

Unknown keys and bad values fail before any work, naming the key's path and what is allowed.
"""

import codecs
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lm.config import ConfigError, GPTConfig, TrainConfig

PARAMS_FILE = "params.yaml"

PLACEMENT_ONLY = {
    "ingest": ("workers",),
    "curate": ("workers", "executor", "work_dir", "ray", "slurm"),
    "tokenize": ("workers",),
}
"""Keys that choose where and on how many processes a stage runs, never what it writes: dvc.yaml leaves them out of
the stage's params, so changing one reruns nothing (tests/test_config.py checks it lists every other key)."""


def config_section(cls):
    """A params section: frozen, keyword-only fields (flows/recipe.py's recipes are parsed the same way)."""
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


@config_section
class Paths:
    """Every artifact's location, relative to the repository root; dvc.yaml reads them as ${paths.*}."""

    sources_fingerprint: str = "data/sources.json"
    """What the ingest sources hold now (files, bytes, a digest): ingest reruns when it changes."""
    raw: str = "data/raw"
    """Ingested documents, Parquet shards."""
    curated: str = "data/curated"
    """Curated documents: train/ and val/ Parquet."""
    tokens: str = "data/tokens"
    """tokenizer.json, train-*.bin, val-*.bin and meta.json, their index."""
    models: str = "models"
    """The folder of every stage's models: <models>/<stage> (prune and quantize: a folder per method). One folder,
    not a path per stage, so that dvc.yaml can name prune's source model, `${paths.models}/${prune.source}`."""
    checkpoints: str = "checkpoints"
    """Resumable training checkpoints, one folder per training stage, kept across runs (not a DVC output): a
    folder, or an fsspec URL (s3://bucket/checkpoints) so that a run killed on one machine resumes on another."""
    metrics: str = "metrics"
    """DVC metrics JSON, one file per stage."""
    plots: str = "plots"
    """DVC plots data (CSV)."""
    reports: str = "reports"
    """Human-readable reports."""

    def model(self, stage: str) -> str:
        """A model-making stage's model directory (prune, quantize: the folder of their methods')."""
        return f"{self.models}/{stage}"

    def __post_init__(self):
        if "://" in self.checkpoints:
            import fsspec

            protocol = self.checkpoints.split("://")[0]
            try:
                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as e:
                raise ConfigError(f"paths.checkpoints: {self.checkpoints!r} has no filesystem here: {e}") from None

    def checkpoint_dir(self, stage: str) -> str:
        """The stage's checkpoint folder or URL."""
        return f"{self.checkpoints.rstrip('/')}/{stage}"

    def cache_dir(self, stage: str) -> Path:
        """A folder on this machine for the stage's memory-mapped caches: its checkpoint folder, or checkpoints/<stage>
        when the checkpoints are remote."""
        return Path(self.checkpoint_dir(stage) if "://" not in self.checkpoints else f"checkpoints/{stage}")


@config_section
class RunConfig:
    seed: int = 1337
    """Seed for every random choice: same params, same numbers on the same machine."""
    experiment: str = "llm-pipeline"
    """MLflow experiment that every stage run is logged to."""
    schedule_cron: str = "0 3 * * *"
    """Cron schedule of the Prefect deployment (flows/deploy.py, prefect.yaml); "" when an interval is set."""
    schedule_interval_s: float = 0
    """Or: seconds between the deployment's runs (0: use the cron schedule)."""
    max_concurrency: int = 2
    """Stages the Prefect flow runs at once, when none depends on another."""
    retries: int = 0
    """Times the Prefect flow retries a failed stage."""
    retry_delay_s: float = 10.0
    """Seconds before a retry."""
    tracking: Literal["best_effort", "required"] = "best_effort"
    """best_effort: a stage that cannot reach the MLflow store warns and runs untracked; required: it stops with
    one line naming the store, before any work."""
    push: bool = True
    """With a default DVC remote configured, the Prefect flow pushes each stage's outputs and run-cache entry as
    soon as the stage has run, so another machine restores them instead of recomputing."""

    def __post_init__(self):
        if self.max_concurrency < 1 or self.retries < 0 or self.retry_delay_s < 0:
            raise ConfigError(
                f"run: max_concurrency must be >= 1 and retries, retry_delay_s >= 0; got {self.max_concurrency}, "
                f"{self.retries}, {self.retry_delay_s}"
            )
        if bool(self.schedule_cron) == (self.schedule_interval_s > 0):
            raise ConfigError(
                "run: set exactly one of schedule_cron and schedule_interval_s (> 0); got "
                f"{self.schedule_cron!r} and {self.schedule_interval_s}"
            )


@config_section
class Source:
    """One input of ingest."""

    path: str
    """`builtin:python` (the interpreter's stdlib source and bundled docs; `builtin:python-source` and
    `builtin:python-docs` each part alone), a file, folder or glob, local or an fsspec URL (s3://bucket/dir,
    https://host/file.jsonl.gz, memory://..., file://...)."""
    name: str = ""
    """Source name recorded on each document; defaults to the path."""
    domain: str = "default"
    """Domain label recorded on each document (what curate's mixing weights refer to)."""
    format: Literal["auto", "text", "jsonl", "parquet", "csv"] = "auto"
    """auto: by suffix (.jsonl/.ndjson/.json[.gz|.zst], .parquet, .csv; anything else is one text document)."""
    text_column: str = "text"
    """The field (JSON Lines) or column (Parquet, CSV) holding the document."""
    encoding: str = "utf-8"
    """How bytes become text: a codec name (strict: bad bytes are an error naming file and line), or "detect".
    A byte-order mark (UTF-8, UTF-16, UTF-32) states the encoding exactly and wins over this."""
    documents: Literal["file", "blank_lines", "lines"] = "file"
    """A text file's documents: the whole file; or its paragraphs (split at blank lines) or lines, grouped in order
    up to `document_chars` (a book or a one-file corpus then becomes many documents, each located by its first
    line, `path:line N`)."""
    document_chars: int = 4000
    """The size, in characters, that paragraphs or lines are grouped up to (one longer stands alone)."""

    def __post_init__(self):
        if self.document_chars < 1:
            raise ConfigError(f"ingest.sources: document_chars must be >= 1, got {self.document_chars}")
        if self.encoding != "detect":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                message = f"ingest.sources: encoding {self.encoding!r} is not a codec; name one, or 'detect'"
                raise ConfigError(message) from None


@config_section
class IngestConfig:
    sources: tuple[Source, ...] = (
        Source(path="builtin:python-source", name="python", domain="code"),
        Source(path="builtin:python-docs", name="python-docs", domain="docs"),
    )
    """Where documents come from."""
    extensions: tuple[str, ...] = (
        ".txt",
        ".md",
        ".py",
        ".rst",
        ".jsonl",
        ".jsonl.gz",
        ".jsonl.zst",
        ".parquet",
        ".csv",
    )
    """File endings read when a source is a folder."""
    max_bytes_per_file: int = 8_000_000
    """Larger text files are an error: likely not text meant for training."""
    max_line_bytes: int = 16_000_000
    """Longer JSON Lines lines (and CSV fields) are an error, read in bounded pieces, never whole."""
    shard_rows: int = 20_000
    """Most documents per Parquet shard."""
    shard_bytes: int = 64_000_000
    """Most text bytes per Parquet shard: what bounds ingest's memory."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad file, line or row: stop with a message naming it (raise), or pass over it and count it (skip)."""
    workers: int = 1
    """Processes reading files at once (new and changed files only: the others come from the cache of each file's
    documents, checkpoints/ingest). The shards are the same for any number."""
    fix_mojibake: bool = False
    """Repair text that was decoded with the wrong codec somewhere upstream ("dÃ©pend" for "dépend"), with ftfy's
    fix_encoding; the documents repaired are counted in metrics/ingest.json (mojibake_fixed)."""

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError(f"ingest.workers must be >= 1, got {self.workers}")


@config_section
class NearDedupConfig:
    enabled: bool = True
    ngram: int = 5
    """Words per shingle."""
    threshold: float = 0.7
    """Jaccard similarity of shingle sets from which two documents count as near duplicates: bands and rows are
    chosen for it (the LSH S-curve's least false positives + false negatives), unless both are set."""
    hashes: int = 112
    """MinHash functions per document when bands and rows are chosen (bands x rows <= hashes)."""
    bands: int = 0
    """LSH bands (0: chosen for the threshold)."""
    rows: int = 0
    """Hashes per band (0: chosen for the threshold)."""

    def __post_init__(self):
        _check_range("curate.near_dedup.threshold", self.threshold, 0.0, 1.0, open_low=True, open_high=True)
        if self.ngram < 1 or self.hashes < 2 or self.bands < 0 or self.rows < 0 or (self.bands > 0) != (self.rows > 0):
            raise ConfigError(
                "curate.near_dedup: ngram >= 1, hashes >= 2, and bands and rows both 0 or both > 0; got "
                f"{self.ngram}, {self.hashes}, {self.bands}, {self.rows}"
            )


@config_section
class FilterStep:
    """A datatrove filter: on or off, and its constructor's keyword arguments (checked when curate builds it)."""

    enabled: bool = False
    options: dict[str, int | float | bool | str | None] = field(default_factory=dict)


@config_section
class LanguageConfig:
    enabled: bool = False
    languages: tuple[str, ...] = ("en",)
    """Keep documents identified as one of these (fastText lid.176 codes)."""
    threshold: float = 0.65
    """...with at least this probability."""
    model_path: str = ""
    """A local fastText language-id model file (lid.176.bin or one trained the same way): nothing is downloaded."""

    def __post_init__(self):
        if self.enabled and not self.model_path:
            raise ConfigError("curate.language.model_path: a local fastText model file is needed when enabled")


@config_section
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    ips: bool = True
    public_ips_only: bool = True
    """Keep private and loopback addresses (127.0.0.1, 10.x: configuration, not personal data)."""
    phones: bool = True
    secrets: bool = True
    """API keys, tokens and private keys (by their issuers' formats, or long values of secret-like names)."""


@config_section
class DecontaminateConfig:
    enabled: bool = True
    ngram: int = 13
    """Drop a training document sharing this many consecutive words with the evaluation text."""
    eval_files: tuple[str, ...] = ("lm/harness_tasks/python_idioms.jsonl", "lm/harness_tasks/python_snippets.jsonl")
    """The evaluation text: JSON Lines (every string of every record) or plain text files."""

    def __post_init__(self):
        if self.ngram < 1 or (self.enabled and not self.eval_files):
            raise ConfigError(f"curate.decontaminate: ngram >= 1 and eval_files when enabled; got {self.ngram}")


@config_section
class SelectionConfig:
    scorer: str = ""
    """"module:factory": factory(**options) returns a function text -> score (e.g. a reference model's
    perplexity); empty: no selection."""
    options: dict[str, int | float | bool | str | None] = field(default_factory=dict)
    min_score: float = float("-inf")
    max_score: float = float("inf")
    """Keep documents scoring within [min_score, max_score]."""


@config_section
class RayExecutorConfig:
    address: str = ""
    """The Ray cluster to run on: "" is $RAY_ADDRESS, else one started on this machine (`ray start --head`), else
    a new one on this machine; or host:port, or ray://host:port."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@config_section
class SlurmExecutorConfig:
    partition: str = ""
    time_minutes: int = 120
    """Each task's time limit (sbatch --time). Minutes, not "HH:MM:SS": DVC's `-S` rewrite of params.yaml drops
    the quotes of "02:00:00", and in a flow mapping the bare value is YAML that DVC itself then cannot read."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """More sbatch options, without their dashes: {account: my-team, qos: normal}."""
    poll_s: float = 5.0
    """How often the stage asks Slurm whether a pass's jobs have left the queue."""

    def __post_init__(self):
        if self.poll_s <= 0 or self.cpus_per_task < 1 or self.mem_per_cpu_gb < 1 or self.time_minutes < 1:
            raise ConfigError(
                "curate.slurm: poll_s > 0, cpus_per_task >= 1, mem_per_cpu_gb >= 1, time_minutes >= 1; got"
                f" {self.poll_s}, {self.cpus_per_task}, {self.mem_per_cpu_gb}, {self.time_minutes}"
            )


@config_section
class CurateConfig:
    tasks: int = 1
    """datatrove tasks: raw shards are dealt out to this many (task i reads shards i, i + tasks, ...). The output
    depends on it (which copy of a duplicate survives, the shard files), not on the executor or on workers."""
    workers: int = 1
    """Tasks run at once, each in its own process (local), Ray task or Slurm array job."""
    executor: Literal["local", "ray", "slurm"] = "local"
    """Where the tasks run: this machine's processes, a Ray cluster, or a Slurm cluster (datatrove's executors)."""
    work_dir: str = ""
    """The passes' working folder, which every task must reach: "" is a temporary folder beside the curated output
    (this machine, or a shared file system); or an fsspec URL (s3://bucket/curate-work), into which the raw shards
    are copied first. Each run works in its own subfolder and removes it."""
    ray: RayExecutorConfig = field(default_factory=RayExecutorConfig)
    slurm: SlurmExecutorConfig = field(default_factory=SlurmExecutorConfig)
    word_tokenizer: Literal["regex", "spacy"] = "regex"
    """How quality filters and MinHash split words: a regex (fast), or spaCy's blank tokenizer (datatrove's
    default, needs `pip install spacy`)."""
    exact_dedup: bool = True
    """Drop documents whose whitespace-normalized, case-folded text another document has."""
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    """MinHash LSH near-duplicate removal, one document kept per cluster."""
    min_chars: int = 200
    """Drop shorter documents."""
    max_chars: int = 400_000
    """Drop longer documents."""
    min_alpha_fraction: float = 0.4
    """Drop documents with fewer alphabetic characters than this fraction (tables, dumps)."""
    max_line_chars: int = 2_000
    """Drop documents with a line longer than this (minified or generated text)."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_quality: FilterStep = field(default_factory=FilterStep)
    """Gopher's word statistics (word count and length, symbol ratio, stop words...): prose, not code."""
    gopher_repetition: FilterStep = field(default_factory=FilterStep)
    """Gopher's repeated lines, paragraphs and n-grams."""
    c4: FilterStep = field(default_factory=FilterStep)
    """C4's line filters (terminal punctuation, short lines, javascript, policy boilerplate...)."""
    fineweb: FilterStep = field(default_factory=FilterStep)
    """FineWeb's line punctuation, short line and duplicate character filters."""
    pii: PIIConfig = field(default_factory=PIIConfig)
    """Replace personal data and secrets in the text."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    mixing_weights: dict[str, float] = field(default_factory=dict)
    """domain -> weight of its train documents: 2.0 writes each twice, 0.5 keeps half (by id); unlisted: 1.0."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a hash of the document id."""
    examples: int = 3
    """Removed documents shown per step in the report."""

    def __post_init__(self):
        _check_range("curate.val_fraction", self.val_fraction, 0.0, 1.0, open_low=True, open_high=True)
        _check_range("curate.min_alpha_fraction", self.min_alpha_fraction, 0.0, 1.0)
        if self.min_chars > self.max_chars:
            raise ConfigError(f"curate.min_chars ({self.min_chars}) must be <= curate.max_chars ({self.max_chars})")
        if self.tasks < 1 or self.workers < 1:
            raise ConfigError(f"curate.tasks and curate.workers must be >= 1, got {self.tasks}, {self.workers}")
        if self.executor == "slurm" and not self.slurm.partition:
            raise ConfigError("curate.slurm.partition: needed with curate.executor: slurm (sinfo lists them)")
        for domain, weight in self.mixing_weights.items():
            if weight < 0:
                raise ConfigError(f"curate.mixing_weights.{domain} must be >= 0, got {weight}")


@config_section
class TokenizeConfig:
    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included."""
    min_frequency: int = 2
    """Merges of pairs seen fewer times are not learned."""
    eos_token: str = "<|endoftext|>"
    """Separates documents in the token stream."""
    special_tokens: tuple[str, ...] = ()
    """More special tokens (never split, never learned from text), after the EOS token's id 0."""
    train_sample_bytes: int = 1_000_000_000
    """The BPE learns its merges from about this many bytes of train text, documents drawn evenly across the split
    by a hash of their id (all of it when smaller; 0: all of it however large)."""
    workers: int = 1
    """Processes encoding curated shards at once, each into its own token file. The tokens are the same for any
    number."""

    def __post_init__(self):
        if self.vocab_size < 260:
            raise ConfigError(f"tokenize.vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        if self.workers < 1:
            raise ConfigError(f"tokenize.workers must be >= 1, got {self.workers}")


@config_section
class PretrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    """Shape of the base model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How it is trained: the `train:` section with this block's keys over it."""
    init_from: str = ""
    """A model directory training continues from (its weights; its shape must be `model`'s); "": new weights.
    DVC reruns pretrain when this key changes, not when that directory does: list it in dvc.yaml's deps if it
    may change under the same path."""


@config_section
class DistillConfig:
    student: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_embd=96, n_head=4))
    """Shape of the student; block_size must not exceed the teacher's."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How it is trained (and the scratch control): the `train:` section with this block's keys over it."""
    alpha: float = 0.5
    """Weight of the KL term; 1 - alpha weighs cross-entropy on the data."""
    temperature: float = 1.0
    """Softmax temperature of teacher and student in the KL term."""
    hidden_weight: float = 0.0
    """Weight of the MSE between the last block's outputs (the student's through a learned projection when the
    widths differ); 0 disables it."""
    attention_weight: float = 1.0
    """Weight of MiniLM-v2 self-attention relation KL (query-query, key-key, value-value) in the last block; 0
    disables it."""
    init_from_teacher: bool = False
    """Start the student from the teacher's embeddings and evenly spaced blocks (same width, heads and variant
    required; only n_layer may differ)."""
    teacher_topk: int = 0
    """0: teacher logits computed on the fly. k > 0: the teacher's top-k logits for every training window are
    computed once and cached on disk (under the distill checkpoints), then reused by every run with the same
    teacher, windows and k: a sweep over the student, alpha or T runs the teacher once. The KL is then over the
    k entries."""

    def __post_init__(self):
        _check_range("distill.alpha", self.alpha, 0.0, 1.0)
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        for key in ("hidden_weight", "attention_weight", "teacher_topk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        if self.teacher_topk and (self.hidden_weight or self.attention_weight):
            raise ConfigError("distill.teacher_topk caches logits only: set hidden_weight and attention_weight to 0")


PruneMethod = Literal["magnitude", "wanda", "nm", "heads", "neurons", "layers", "dense"]


@config_section
class PruneConfig:
    source: Literal["pretrain", "distill", "scratch"] = "distill"
    """The model pruned."""
    methods: tuple[PruneMethod, ...] = ("magnitude", "wanda", "nm", "heads", "neurons", "layers")
    """One pruned model per method, evaluated as prune_<method>. magnitude: smallest |w|; wanda: smallest
    |w| * ||x|| per output row (Sun et al. 2024); nm: keep n of every m consecutive weights by the Wanda score
    (2:4 by default); heads, neurons: the attention heads / MLP neurons of least activation-weighted norm,
    per layer; layers: the blocks whose output is closest in angle to their input (Gromov et al. 2024); dense:
    nothing removed, the control for recovery training (listed in `recover`, it measures what the recovery steps
    alone gain, to subtract from a pruned model's)."""
    sparsity: float = 0.5
    """magnitude, wanda: fraction of the blocks' weights set to zero; heads, neurons, layers: fraction of those
    removed (nm's sparsity is 1 - n/m)."""
    scope: Literal["layer", "global"] = "layer"
    """magnitude: layer: each matrix loses `sparsity` of its weights; global: one threshold over all of them."""
    n: int = 2
    """nm: weights kept in each group of m."""
    m: int = 4
    """nm: group size along the input dimension."""
    calibration_samples: int = 64
    """Train windows whose activations score weights (wanda, nm, heads, neurons) and layers."""
    recover: tuple[PruneMethod, ...] = ("nm", "heads", "neurons", "layers")
    """Methods followed by recovery training with the pruned weights held at zero (those not in methods are
    ignored, so narrowing methods needs no edit here)."""
    seed: int | None = None
    """Recovery training's seed (its data order); None: run.seed. Its own key lets a recipe's seeds vary the
    recovery without retraining the source."""
    recovery: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=60, lr=1e-3, min_lr=1e-4, warmup_steps=5, checkpoint_every=0, log_every=10
        )
    )
    """How recovery training runs: the `train:` section with this block's keys over it."""

    def __post_init__(self):
        _check_range("prune.sparsity", self.sparsity, 0.0, 1.0, open_high=True)
        if not 0 < self.n < self.m:
            raise ConfigError(f"prune.n ({self.n}) must be in [1, prune.m ({self.m}))")
        if not self.methods:
            raise ConfigError("prune.methods: list at least one method")


@config_section
class QuantizeConfig:
    source: str = "prune_wanda"
    """The model quantized: pretrain, distill, scratch or prune_<method> for a method in prune.methods."""
    methods: tuple[Literal["int8", "int4_rtn", "int4_gptq"], ...] = ("int8", "int4_rtn", "int4_gptq")
    """One quantized model per method, evaluated as quantize_<method>. int8: torchao weight-only int8, a scale
    per output channel (embedding: per row); int4_rtn: 4-bit group-wise round-to-nearest; int4_gptq: 4-bit
    group-wise GPTQ calibrated on train tokens. All quantize the blocks, the head and the embedding."""
    group_size: int = 128
    """int4: input columns sharing one scale and zero point."""
    calibration_samples: int = 512
    """int4_gptq: train windows whose activations form each layer's Hessian."""
    damp: float = 0.1
    """int4_gptq: Hessian dampening, a fraction of its mean diagonal."""
    act_order: bool = True
    """int4_gptq: quantize each layer's input columns by decreasing input energy, group scales from the
    original weights (AutoGPTQ's desc_act + static_groups); false: in input order."""

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("quantize.methods: list at least one method")
        if self.group_size < 8:
            raise ConfigError(f"quantize.group_size must be >= 8, got {self.group_size}")


@config_section
class Gate:
    """What a model must meet to be promoted; each threshold is off until set."""

    max_val_loss_increase: float = math.inf
    """Nats per token over the model it was made from, judged on the upper end of the 95% interval of the
    paired difference (val_loss_delta + val_loss_delta_ci95), not the point estimate."""
    max_file_bytes: float = math.inf
    max_latency_ms: float = math.inf
    """CPU greedy decoding, milliseconds per token (latency_ms_per_token)."""


@config_section
class EvaluateConfig:
    models: tuple[str, ...] = ()
    """The models scored (a recipe comparing two needs no others); (): every model the pipeline makes. A derived
    model is compared with its source, and a compare pair reported, only when both are scored."""
    max_val_tokens: int = 262_144
    """Validation tokens scored per model (at most; fewer if val is smaller). The default covers the default
    corpus's whole val split: the more windows, the narrower the intervals of the comparisons."""
    batch_size: int = 32
    """Sequences per evaluation batch."""
    latency_tokens: int = 32
    """Tokens generated greedily after the first prompt to time latency."""
    prompts: tuple[str, ...] = ("def main():", "The ", "import ")
    """Fixed prompts; every model continues each of them in the report."""
    sample_tokens: int = 48
    """Tokens sampled per prompt."""
    temperature: float = 0.8
    """Sampling temperature of the samples (0: greedy)."""
    top_k: int = 50
    """Samples draw from the top_k most likely tokens."""
    seed: int = 0
    """Seed of the samples: the same model and prompts give the same text."""
    compare: tuple[tuple[str, ...], ...] = (
        ("distill", "scratch"),
        ("prune_wanda", "prune_magnitude"),
        ("quantize_int4_gptq", "quantize_int4_rtn"),
    )
    """Pairs [a, b] of model names: the val loss of a minus b, with its 95% interval over the val windows, in
    metrics/compare.json and the report. Every derived model is also compared with its source."""
    gates: dict[str, Gate] = field(default_factory=dict)
    """Model name or role (teacher, student, int8, int4) -> the thresholds it must meet to be promoted: its
    registry role alias and `champion` move only to versions whose gates passed."""
    gates_mode: Literal["fail", "warn"] = "fail"
    """fail: a failed gate fails evaluate (and the flow), one line per gate; warn: it is only reported."""
    champion: str = "int4"
    """The model or role whose version gets the registry alias `champion` when its gates pass; "": none."""

    def __post_init__(self):
        if any(len(pair) != 2 or pair[0] == pair[1] for pair in self.compare):
            raise ConfigError(f"evaluate.compare: each entry must be two different model names, got {self.compare}")
        if not self.prompts:
            raise ConfigError("evaluate.prompts: list at least one prompt")
        if self.temperature < 0 or self.top_k < 1:
            raise ConfigError(f"evaluate.temperature must be >= 0 and top_k >= 1, got {self.temperature}, {self.top_k}")


@config_section
class SweepConfig:
    grid: dict[str, tuple[str | int | float | bool, ...]] = field(
        default_factory=lambda: {
            "pretrain.model.norm_placement": ("pre", "mix_ln"),
            "pretrain.train.schedule": ("cosine", "wsd"),
        }
    )
    """params key -> values; every combination is one DVC experiment (`dvc exp run -S key=value ...`)."""
    jobs: int = 1
    """Experiments run at once (DVC queue workers); each trains on its own, so mind the cores."""
    targets: tuple[str, ...] = ()
    """Stages each experiment reproduces (with what they depend on); empty: the whole pipeline."""

    def __post_init__(self):
        if self.jobs < 1 or not self.grid or not all(self.grid.values()):
            raise ConfigError(f"sweep: jobs must be >= 1 and every grid key needs values; got {self.jobs}, {self.grid}")


# the four variants a user asks for by role; each is also a registry alias of its model, beside the model's name
ROLES = {"pretrain": "teacher", "distill": "student", "quantize_int8": "int8", "quantize_int4_gptq": "int4"}


@config_section
class Params:
    paths: Paths = field(default_factory=Paths)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    """The defaults of every training block (pretrain.train, distill.train, prune.recovery): each block lists
    only the keys where it differs, so a shared change is written once."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        models = self.models()
        if self.quantize.source not in models or self.quantize.source.startswith("quantize_"):
            allowed = [m for m in models if not m.startswith("quantize_")]
            raise ConfigError(f"quantize.source: {self.quantize.source!r} is not allowed; choose one of {allowed}")
        gated = {*models, *ROLES.values()}
        named = [(f"evaluate.gates.{name}", name) for name in self.evaluate.gates]
        for key, name in named + ([("evaluate.champion", self.evaluate.champion)] if self.evaluate.champion else []):
            if name not in gated:
                raise ConfigError(f"{key}: {name!r} is not a model or role; choose from {sorted(gated)}")
        for name, gate in self.evaluate.gates.items():
            if gate.max_val_loss_increase < math.inf and self.by_role(name) not in self.made_from():
                raise ConfigError(
                    f"evaluate.gates.{name}.max_val_loss_increase: {name} is not made from another model; "
                    f"derived models: {sorted(self.made_from())}"
                )
        for i, name in enumerate(self.evaluate.models):
            if name not in models:
                raise ConfigError(
                    f"evaluate.models[{i}]: {name!r} is not a model these params make; choose from {list(models)}"
                )
        for (key, name), gate in zip(named, self.evaluate.gates.values(), strict=True):
            model = self.by_role(name)
            needed = [model] + ([self.made_from()[model]] if gate.max_val_loss_increase < math.inf else [])
            if missing := [m for m in needed if m not in self.evaluated()]:
                raise ConfigError(f"{key}: {model}'s gate needs {missing} scored; add them to evaluate.models")
        for i, pair in enumerate(self.evaluate.compare):
            for name in pair:
                if name not in models:
                    raise ConfigError(
                        f"evaluate.compare[{i}]: {name!r} is not a model these params make; choose from {list(models)}"
                    )

    def models(self) -> dict[str, str]:
        """Every model the pipeline makes, by the name evaluate reports it under -> its directory."""
        models = {stage: self.paths.model(stage) for stage in ("pretrain", "distill", "scratch")}
        models |= {f"prune_{m}": f"{self.paths.model('prune')}/{m}" for m in self.prune.methods}
        return models | {f"quantize_{m}": f"{self.paths.model('quantize')}/{m}" for m in self.quantize.methods}

    def evaluated(self) -> dict[str, str]:
        """The models evaluate scores: evaluate.models, or every one."""
        models = self.models()
        return {name: models[name] for name in self.evaluate.models} if self.evaluate.models else models

    def by_role(self, name: str) -> str:
        """The model a role names (student -> distill), or the model name itself."""
        return {role: model for model, role in ROLES.items()}.get(name, name)

    def made_from(self) -> dict[str, str]:
        """Each derived model's name -> the name of the model it was made from."""
        made_from = {"distill": "pretrain"} | {f"prune_{m}": self.prune.source for m in self.prune.methods}
        return made_from | {f"quantize_{m}": self.quantize.source for m in self.quantize.methods}

    def model_tags(self, model: str) -> dict[str, str]:
        """What a model's MLflow rows say about it: its name, role (ROLES, else "-"), the model it was made from
        ("-" for one trained from scratch) and the method that made it (`wanda` for prune_wanda)."""
        stage, _, method = model.partition("_")
        made_from = self.made_from().get(model, "-")
        return {"model": model, "role": ROLES.get(model, "-"), "made_from": made_from, "method": method or stage}


def _check_range(key, value, low, high, open_low=False, open_high=False):
    ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ConfigError(f"{key} must be in {lo}{low}, {high}{hi}, got {value}")


def _parse(tp, value, key: str):
    """Build a value of type `tp` from YAML data, failing with the key's path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_section(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        value_tp = typing.get_args(tp)[1]
        return {str(k): _parse(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_parse(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _parse(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_section(cls, data, key: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {name: _parse(hints[name], v, f"{key}.{name}" if key else name) for name, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if cls.__module__ == __name__:  # this module's sections name their keys; lm's configs name fields only
            raise
        raise ConfigError(f"{key}: {e}" if key else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key or 'params'}: {e}") from None


# the training blocks: each is the `train:` section with its own keys over it
TRAINING_BLOCKS = (("pretrain", "train"), ("distill", "train"), ("prune", "recovery"))


def parse_params(data: dict) -> Params:
    data = dict(data or {})
    if "train" in data:
        shared = data["train"]
        _parse(TrainConfig, shared, "train")  # a bad shared value is named where it is written
        for section, block in TRAINING_BLOCKS:
            own = dict(data.get(section) or {})
            own[block] = merge(shared, own.get(block) or {})
            data[section] = own
    return _parse_section(Params, data, "")


def read_yaml(path: str | Path):
    """A YAML file read as DVC reads params.yaml (YAML 1.2): a value that `dvc exp run -S` wrote into it (6e-05,
    unquoted) means here what it means to DVC, where YAML 1.1 would read a string."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe", pure=True).load(Path(path).read_text())
    except (OSError, YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; errors name the file and the key."""
    path = Path(path)
    data = read_yaml(path)
    try:
        return parse_params(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_as(cls, path: str | Path):
    """A YAML file parsed into the dataclass `cls` (a section of this module's kind); errors name the file and
    the key."""
    path = Path(path)
    data = read_yaml(path)
    try:
        return _parse_section(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def as_dict(section) -> dict:
    return dataclasses.asdict(section)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: keys as `dvc exp run -S` and MLflow params name them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: the inverse of flatten."""
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def merge(base: dict, overrides: dict) -> dict:
    """base with overrides applied key by key, recursing into mappings; base's key order is kept."""
    merged = {
        k: merge(v, overrides[k]) if isinstance(v, dict) and isinstance(overrides.get(k), dict) else overrides.get(k, v)
        for k, v in base.items()
    }
    return merged | {k: v for k, v in overrides.items() if k not in base}
