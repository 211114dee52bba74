"""bench.py runs on CPU and reports the figures it prints."""

from __future__ import annotations

import pytest

from bench import BenchConfig, bench
from configurator import UserError

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, device="cpu", peak_flops=1e11)


def test_bench_train_reports_time_throughput_and_mfu(capsys):
    result = bench(BenchConfig(what="train", batch_size=4, steps=3, warmup=1, **TINY))
    assert result["ms_per_iter"] > 0
    assert result["tokens_per_sec"] == pytest.approx(4 * 32 / (result["ms_per_iter"] / 1000))
    assert 0 < result["mfu"] < 1
    assert "ms/iter" in capsys.readouterr().out


def test_bench_sample_compares_cache_and_recompute(capsys):
    result = bench(BenchConfig(what="sample", max_new_tokens=40, repeats=1, **TINY))
    assert result["kv_cache"] > 0 and result["recompute"] > 0
    assert "KV cache speed-up" in capsys.readouterr().out


def test_bench_refuses_unknown_mode():
    with pytest.raises(UserError, match="what must be"):
        BenchConfig(what="fly")
