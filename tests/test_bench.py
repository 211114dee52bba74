"""bench.py runs on CPU and reports the figures it prints."""

from __future__ import annotations

import json

import pytest
import torch

from gptsmith.bench import bench
from gptsmith.config import BenchConfig
from gptsmith.configurator import UserError
from gptsmith.model import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, device="cpu", peak_flops=1e11)


def test_bench_train_reports_time_throughput_and_mfu(capsys):
    result = bench(BenchConfig(what="train", batch_size=4, steps=3, warmup=1, **TINY))
    assert result["ms_per_iter"] > 0
    assert result["tokens_per_sec"] == pytest.approx(4 * 32 / (result["ms_per_iter"] / 1000))
    assert 0 < result["mfu"] < 1
    out = capsys.readouterr().out
    assert "ms/iter" in out
    record = json.loads(out.strip().splitlines()[-1])  # the machine-readable line comes last
    assert record["what"] == "train" and record["device"] == "cpu" and record["compile"] is False
    assert record["tokens_per_sec"] == pytest.approx(result["tokens_per_sec"]) and record["peak_flops"] == 1e11
    assert record["achieved_flops"] == pytest.approx(record["mfu"] * 1e11) and record["params"] > 0


def test_bench_sample_compares_cache_and_recompute(capsys):
    result = bench(BenchConfig(what="sample", max_new_tokens=40, repeats=1, **TINY))
    assert result["kv_cache"] > 0 and result["recompute"] > 0
    out = capsys.readouterr().out
    assert "KV cache speed-up" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["kv_cache_tokens_per_sec"] == pytest.approx(result["kv_cache"])
    assert record["speedup"] == pytest.approx(result["kv_cache"] / result["recompute"])


@pytest.mark.slow  # torch.compile: about 10 s on a 2-core CPU
def test_bench_sample_compiles_the_decode_step(capsys, monkeypatch):
    compiled = []
    real = GPT.compile_decode
    monkeypatch.setattr(GPT, "compile_decode", lambda model: compiled.append(model) or real(model))
    result = bench(BenchConfig(what="sample", max_new_tokens=40, repeats=1, compile=True, **TINY))
    assert len(compiled) == 1 and result["kv_cache"] > 0 and result["recompute"] > 0
    lines = capsys.readouterr().out.strip().splitlines()
    modes = ["sample (KV cache)", "sample (recompute)", "KV cache speed-up"]  # the lines as without compile
    assert [line.split(":")[0] for line in lines[1:4]] == modes
    assert json.loads(lines[-1])["compile"] is True


def test_bench_sample_counts_every_sequence_of_a_batch(capsys):
    result = bench(BenchConfig(what="sample", max_new_tokens=20, repeats=1, num_samples=3, **TINY))
    assert result["kv_cache"] > 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["kv_cache_tokens_per_sec"] == pytest.approx(result["kv_cache"])
    with pytest.raises(UserError, match="num_samples"):
        BenchConfig(what="sample", num_samples=0)


def test_bench_takes_the_model_options(capsys):
    options = dict(
        pos_emb="rope",
        norm="rmsnorm",
        activation="swiglu",
        qk_norm=True,
        n_kv_head=1,
        tie_weights=False,
        logit_softcap=10.0,
    )
    result = bench(BenchConfig(what="train", batch_size=2, steps=1, warmup=0, **options, **TINY))
    assert result["tokens_per_sec"] > 0
    with pytest.raises(UserError, match="n_kv_head"):
        BenchConfig(n_kv_head=5, n_head=4, n_embd=32)


def test_bench_refuses_unknown_mode():
    with pytest.raises(UserError, match="what must be"):
        BenchConfig(what="fly")


def test_bench_train_passes_its_compile_mode_to_torch_compile(monkeypatch):
    """compile_mode=reduce-overhead reaches torch.compile (CUDA graphs on a GPU; a CPU runs it as default)."""
    import torch

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw["mode"]) or model)
    for mode in ("default", "reduce-overhead"):
        bench(BenchConfig(what="train", batch_size=2, steps=1, warmup=0, compile=True, compile_mode=mode, **TINY))
    assert modes == ["default", "reduce-overhead"]
    with pytest.raises(UserError, match="compile_mode"):
        BenchConfig(what="train", compile_mode="max-autotune-everything")


def test_bench_train_with_master_weights_steps_float32_masters_through_bfloat16_copies(capsys, monkeypatch):
    from gptsmith import optim

    made, real, residual = [], optim.MasterWeights, set()

    def spy(model: GPT) -> optim.MasterWeights:
        made.append((real(model), [p.detach().clone() for p in model.parameters()]))
        made[-1][0].compute.transformer.h[0].register_forward_hook(lambda m, i, out: residual.add(out.dtype))
        return made[-1][0]

    monkeypatch.setattr(optim, "MasterWeights", spy)
    bench(BenchConfig(what="train", batch_size=4, steps=3, warmup=1, dtype="bfloat16", master_weights=True, **TINY))
    ((weights, initial),) = made
    assert residual == {torch.bfloat16}  # every step ran through the bfloat16 copies
    assert not any(torch.equal(m, p) for m, p in zip(weights.masters, initial) if m.dim() == 2)  # they were stepped
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["master_weights"] is True
    assert {p.dtype for p in weights.masters} == {torch.float32} and {p.dtype for p in weights.copies} == {
        torch.bfloat16
    }
    assert all(torch.equal(low, m.to(torch.bfloat16)) for low, m in zip(weights.copies, weights.masters))
    with pytest.raises(UserError, match="master_weights=True needs dtype=bfloat16"):
        BenchConfig(what="train", dtype="float32", master_weights=True)


def test_bench_profiles_the_steps_and_tokens_asked_for(capsys, monkeypatch):
    clipped = []  # one gradient clipping per training step
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(1) or real_clip(*a, **k))
    result = bench(BenchConfig(what="train", batch_size=2, steps=5, warmup=0, profile=3, **TINY))
    assert len(clipped) == 5 + 3  # the timed group of five, then the three profiled
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::mm" in out  # the profiler's table of operators
    assert "profile: 3 steps, " in out and result["profiled_ms_each"] > 0
    assert json.loads(out.strip().splitlines()[-1])["profiled_ms_each"] == result["profiled_ms_each"]

    generated = []
    real_generate = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda m, idx, n, **kw: generated.append(n) or real_generate(m, idx, n, **kw))
    bench(BenchConfig(what="sample", max_new_tokens=10, repeats=1, profile=7, **TINY))
    assert generated[-1] == 7  # after the timed generations, one of the tokens asked for
    out = capsys.readouterr().out
    assert "profile: 7 new tokens (KV cache), " in out and "aten::" in out
    assert json.loads(out.strip().splitlines()[-1])["profiled_ms_each"] > 0
    with pytest.raises(UserError, match="profile"):
        BenchConfig(what="train", profile=-1)
