"""Measure speed: a bare training step, or sampling with and without the KV cache.

    python bench.py --what=train --device=cpu --compile=False --n_layer=4 --n_head=4 --n_embd=128 --block_size=64
    python bench.py --what=sample --device=cpu --n_layer=6 --n_head=6 --n_embd=384 --block_size=256

Random weights and random tokens: speed does not depend on what the model knows. Prints
medians, so a noisy shared machine disturbs the figures as little as possible. Each
measurement is printed twice: a line for people, then one JSON line for scripts.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from gptsmith import optim
from gptsmith.config import BenchConfig
from gptsmith.configurator import cli_errors, load_config
from gptsmith.metrics import Profiler
from gptsmith.model import GPT
from gptsmith.runtime import Runtime, choose_training_dtype, peak_flops, setup_runtime, teardown


def _emit(cfg: BenchConfig, rt: Runtime, model: GPT, figures: dict[str, float | None]) -> None:
    """One JSON line with the run's setting and its figures, for scripts collecting results."""
    record = {
        "what": cfg.what,
        "device": str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."),
        "compile": cfg.compile,
        "master_weights": cfg.master_weights,
        "params": model.get_num_params(),
        **figures,
    }
    print(json.dumps(record))


def _profile(rt: Runtime, work: Callable[[], None], count: int, unit: str) -> dict[str, float]:
    """Run work (count steps or tokens) under the profiler; its figures."""
    profiler = Profiler(rt)
    profiler.start()
    work()
    return profiler.stop(count, unit)


def bench_train(cfg: BenchConfig, rt: Runtime, model: GPT) -> dict[str, float]:
    """Time of a full training step on random tokens, taken as train.py takes it: fused AdamW,
    clipping, the update skipped on the device if non-finite, and no wait for the device between
    steps. Steps are timed in groups of five with a wait at each end; the median group counts."""
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), rt.device_type)
    weights = optim.master_weights(model, rt) if cfg.master_weights else None
    step_model = weights.compute if weights is not None else model
    if cfg.compile:  # reduce-overhead: a small model's compiled step waits on the host launching its kernels
        step_model = torch.compile(step_model, mode=cfg.compile_mode, fullgraph=True, dynamic=False)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=rt.device)

    def step() -> None:
        with rt.autocast():
            _, loss = step_model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step_unless(optimizer, ~(loss.isfinite() & norm.isfinite()))
        optimizer.zero_grad(set_to_none=True)
        if weights is not None:
            weights.sync()

    for _ in range(cfg.warmup):
        step()
    group, times = 5, []
    for _ in range(max(1, cfg.steps // group)):
        rt.synchronize()
        t0 = time.perf_counter()
        for _ in range(group):
            step()
        rt.synchronize()
        times.append((time.perf_counter() - t0) / group)
    dt = statistics.median(times)
    tps = cfg.batch_size * cfg.block_size / dt
    peak = peak_flops(rt, cfg.peak_flops)
    mfu = peak.mfu(model.flops_per_token() * tps)
    shown = f"{mfu * 100:.1f}%" if mfu is not None else f"n/a (peak {peak.source})"
    print(f"train: {dt * 1000:.2f} ms/iter (median of {len(times)} groups of {group}), {tps:,.0f} tok/s, mfu {shown}")
    result = {"ms_per_iter": dt * 1000, "tokens_per_sec": tps, "mfu": mfu}
    if cfg.profile:
        result |= _profile(rt, lambda: [step() for _ in range(cfg.profile)], cfg.profile, "steps")
    _emit(cfg, rt, model, {**result, "achieved_flops": model.flops_per_token() * tps, "peak_flops": peak.flops})
    return result


def bench_sample(cfg: BenchConfig, rt: Runtime, model: GPT) -> dict[str, float]:
    """New tokens per second with the KV cache and with the window recomputed per token. With compile,
    the KV cache's decode step is compiled (a CUDA graph on GPUs); the recomputation runs uncompiled."""
    model.eval()
    model.cast_for_inference(rt.ptdtype)  # as sample.py decodes
    prompt = torch.zeros((cfg.num_samples, 1), dtype=torch.long, device=rt.device)
    if cfg.compile:
        model.compile_decode()
    result = {}
    for use_cache in (True, False):
        if use_cache and cfg.compile:  # compiled (and on GPUs recorded as a CUDA graph) before the clock runs
            with torch.inference_mode(), rt.autocast():
                model.generate(prompt, min(cfg.max_new_tokens, 8), top_k=200)
        times = []
        for r in range(cfg.repeats):
            g = torch.Generator(device=rt.device).manual_seed(cfg.seed + r)
            rt.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(), rt.autocast():
                model.generate(prompt, cfg.max_new_tokens, top_k=200, generator=g, use_cache=use_cache)
            rt.synchronize()
            times.append(time.perf_counter() - t0)
        tps = cfg.num_samples * cfg.max_new_tokens / statistics.median(times)
        result["kv_cache" if use_cache else "recompute"] = tps
        print(f"sample ({'KV cache' if use_cache else 'recompute'}): {tps:,.1f} tok/s (median of {cfg.repeats})")
    print(f"KV cache speed-up: {result['kv_cache'] / result['recompute']:.1f}x")
    figures = {
        "kv_cache_tokens_per_sec": result["kv_cache"],
        "recompute_tokens_per_sec": result["recompute"],
        "speedup": result["kv_cache"] / result["recompute"],
    }
    if cfg.profile:

        def decode() -> None:
            g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
            with torch.inference_mode(), rt.autocast():
                model.generate(prompt, cfg.profile, top_k=200, generator=g)

        figures |= _profile(rt, decode, cfg.profile, "new tokens (KV cache)")
    _emit(cfg, rt, model, figures)
    return result


def bench_peak(rt: Runtime) -> dict[str, float | None]:
    """Measure the matmul peak that MFU divides by, and remember it for this machine."""
    peak = peak_flops(rt, remeasure=True)
    shown = f"{peak.flops / 1e12:.3g} TFLOP/s" if peak.flops else "not kept"
    print(f"peak: {shown} ({peak.source})")
    return {"peak_flops": peak.flops}


def bench(cfg: BenchConfig) -> dict[str, float]:
    """Run the benchmark cfg.what and return its figures."""
    rt = setup_runtime(cfg.device, cfg.dtype, sdpa_backend=cfg.sdpa_backend)
    try:
        if cfg.what == "peak":
            return bench_peak(rt)
        if cfg.what == "train":  # dtype=auto on a CPU chooses as train.py does
            choose_training_dtype(rt, cfg.dtype, cfg.gpt_config(cfg.vocab_size), cfg.batch_size)
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.gpt_config(cfg.vocab_size)).to(rt.device)
        print(f"{cfg.what}: {model.get_num_params() / 1e6:.2f}M parameters on {rt.device} ({rt.dtype})")
        if rt.dtype_reason:
            print(f"dtype=auto chose {rt.dtype}: {rt.dtype_reason}")
        return bench_train(cfg, rt, model) if cfg.what == "train" else bench_sample(cfg, rt, model)
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        bench(load_config(BenchConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
