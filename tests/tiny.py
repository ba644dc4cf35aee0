"""Params for tests: models and runs small enough for seconds on 2 CPU cores."""

TINY = {
    "ingest": {"sources": [{"path": "CORPUS", "name": "synthetic", "domain": "prose"}], "extensions": [".txt"]},
    "curate": {"min_chars": 100, "val_fraction": 0.2},
    "tokenize": {"vocab_size": 320},
    "pretrain": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"max_steps": 30, "batch_size": 8, "warmup_steps": 3, "log_every": 5, "val_batches": 4},
    },
    "distill": {
        "student": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
        "train": {"max_steps": 10, "batch_size": 8, "warmup_steps": 2, "log_every": 5, "val_batches": 4},
    },
    "prune": {
        "calibration_samples": 8,
        "recovery": {"max_steps": 6, "batch_size": 8, "warmup_steps": 1, "log_every": 2, "val_batches": 4},
    },
    "quantize": {"calibration_samples": 8},
    "evaluate": {"max_val_tokens": 1024, "batch_size": 8, "latency_tokens": 4},
}
