"""Domains along the token stream: recorded by tokenize, scored per domain, and upsampled at the end of training."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lm.config import ConfigError, TrainConfig
from lm.data import DomainMixture, final_mixture, training_windows
from lm.scoring import domain_losses, window_domains
from lm.tokens import DomainRuns, domain_runs
from stages.tokenize import encode_to_file


def byte_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_tokens([chr(c) for c in range(32, 127)])
    return tok


def test_tokenize_records_where_each_domain_runs(tmp_path):
    texts, domains = ["ab", "cde", "f", "gh"], ["code", "code", "docs", "code"]
    counts = encode_to_file(byte_tokenizer(), iter(texts), 0, np.dtype(np.uint16), tmp_path / "t.bin", iter(domains))
    assert counts["domains"] == [[0, "code"], [7, "docs"], [9, "code"]]  # each document and its EOS
    assert counts["tokens"] == 12


def test_domain_runs_join_shards_and_place_positions(tmp_path):
    meta = {
        "splits": {
            "val": {
                "shards": [
                    {"file": "a", "tokens": 10, "domains": [[0, "code"], [6, "docs"]]},
                    {"file": "b", "tokens": 10, "domains": [[0, "docs"], [4, "code"]]},
                ]
            }
        }
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    runs = domain_runs(tmp_path, "val")
    assert runs.starts.tolist() == [0, 6, 14] and runs.domains == ["code", "docs", "code"]
    assert runs.at(np.array([0, 5, 6, 13, 14, 19])) == ["code", "code", "docs", "docs", "code", "code"]
    assert runs.spans("docs", 20) == [(6, 14)] and runs.spans("code", 16) == [(0, 6), (14, 16)]
    assert window_domains(tmp_path, 4, 5) == ["code", "docs", "docs", "code", "code"]  # by each window's middle token
    assert DomainRuns(np.array([], dtype=np.int64), []).at(np.array([3])) == [""], "token files without domains"


def test_domain_losses_average_each_domains_windows_and_stay_quiet_for_one_domain():
    losses = np.array([1.0, 3.0, 2.0, 6.0])
    assert domain_losses(losses, ["a", "a", "b", "b"]) == {"val_loss_a": 2.0, "val_loss_b": 4.0}
    assert domain_losses(losses, ["a"] * 4) == {}


def test_the_final_mixture_upsamples_a_domain_in_the_last_steps_only():
    tokens = np.arange(10_000)  # a window's first token is its start
    runs = DomainRuns(np.array([0, 9_000]), ["code", "docs"])  # docs: the last 10%
    mixture = DomainMixture(runs, len(tokens), {"docs": 9.0}, block_size=8)
    assert mixture.probabilities == pytest.approx([9_000 / 17_919, 8_919 / 17_919])  # starts up to 9991
    windows = training_windows(tokens, 8, 4, max_steps=100, world_size=1, seed=0, mixture=mixture, final_steps=20)
    assert windows.mixture_from == 80 * 4
    docs = np.array([int(windows[i][0][0]) >= 9_000 for i in range(len(windows))])
    assert docs[:320].mean() < 0.2 and docs[320:].mean() > 0.35
    plain = training_windows(tokens, 8, 4, max_steps=100, world_size=1, seed=0)
    assert all(torch.equal(plain[i][0], windows[i][0]) for i in range(320)), "the steps before: the same windows"


def test_mixture_starts_fall_in_their_domains_spans_evenly():
    runs = DomainRuns(np.array([0, 100, 130, 500, 520]), ["code", "docs", "code", "docs", "code"])
    mixture = DomainMixture(runs, 1_000, {"code": 0.0}, block_size=8)  # docs only: spans [100, 130), [500, 520)
    rng = np.random.default_rng(0)
    starts = np.array([mixture.start(rng) for _ in range(5_000)])
    in_docs = ((starts >= 100) & (starts < 130)) | ((starts >= 500) & (starts < 520))
    assert in_docs.all() and len(set(starts)) == 50
    assert np.mean(starts < 130) == pytest.approx(30 / 50, abs=0.03), "uniform over the domain's tokens"


def test_a_final_mixture_names_domains_the_tokens_have(tmp_path):
    with pytest.raises(
        ConfigError, match=r"final_mixture: no train tokens of domain \['web'\]; the domains: \['code', 'docs'\]"
    ):
        DomainMixture(DomainRuns(np.array([0, 10]), ["code", "docs"]), 100, {"web": 2.0}, 4)
    with pytest.raises(ConfigError, match="final_mixture: weights must be >= 0"):
        TrainConfig(final_mixture={"docs": -1.0})
    assert final_mixture(TrainConfig(), tmp_path, 100, 4) == (None, 0)
