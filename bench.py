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
from dataclasses import dataclass

import torch

from configurator import UserError, cli_errors, load_config, opt
from model import GPT, MODEL_OPTIONS, GPTConfig
from runtime import Runtime, peak_flops, setup_runtime, teardown


@dataclass
class BenchConfig:
    """Benchmark configuration."""

    what: str = opt(
        "train",
        "'train' (forward, backward, optimizer step), 'sample' (KV cache vs recompute), or 'peak' (measure this "
        "machine's matmul peak for MFU again and remember it; run it on an idle machine)",
    )
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    block_size: int = opt(1024, "context length")
    vocab_size: int = opt(50304, "vocabulary size (65 for shakespeare_char)")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers")
    pos_emb: str = opt("learned", "'learned' or 'rope' (rotary)")
    norm: str = opt("layernorm", "'layernorm' or 'rmsnorm'")
    activation: str = opt("gelu", "'gelu', 'relu2' or 'swiglu'")
    qk_norm: bool = opt(False, "RMSNorm on queries and keys")
    n_kv_head: int | None = opt(None, "key/value heads (grouped-query attention); None = n_head")
    tie_weights: bool = opt(True, "tie the token embedding and the output layer")
    logit_softcap: float = opt(0.0, "soft-cap the logits to (-c, c); 0 = off")
    batch_size: int = opt(12, "sequences per step (train)")
    steps: int = opt(20, "timed steps (train)")
    warmup: int = opt(5, "untimed steps first: compilation, allocator, caches (train)")
    max_new_tokens: int = opt(500, "tokens to generate (sample)")
    num_samples: int = opt(1, "sequences decoded side by side (sample); tokens/s counts the tokens of all")
    repeats: int = opt(3, "generations per mode; the median is reported (sample)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N, mps")
    dtype: str = opt("auto", "auto, float32, bfloat16, float16")
    compile: bool = opt(False, "torch.compile the model")
    peak_flops: float = opt(0.0, "device peak FLOP/s for MFU; 0 = known GPU table or a measured matmul")
    seed: int = opt(1337, "random seed")

    def __post_init__(self) -> None:
        if self.what not in ("train", "sample", "peak"):
            raise UserError(f"what must be 'train', 'sample' or 'peak', got {self.what!r}")
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "steps", "max_new_tokens",
                    "num_samples", "repeats"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        try:
            self.model_config()
        except ValueError as e:
            raise UserError(str(e)) from None

    def model_config(self) -> GPTConfig:
        """The GPTConfig of the benchmarked model."""
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, bias=self.bias,
                         **{k: getattr(self, k) for k in MODEL_OPTIONS})  # fmt: skip


def _emit(cfg: BenchConfig, rt: Runtime, model: GPT, figures: dict[str, float | None]) -> None:
    """One JSON line with the run's setting and its figures, for scripts collecting results."""
    record = {"what": cfg.what, "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."),
              "compile": cfg.compile, "params": model.get_num_params(), **figures}  # fmt: skip
    print(json.dumps(record))


def _sync(rt: Runtime) -> None:
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


def bench_train(cfg: BenchConfig, rt: Runtime, model: GPT) -> dict[str, float]:
    """Median time of a full training step on random tokens."""
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), rt.device_type)
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=rt.device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        with rt.autocast():
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device, as the training loop's logging does
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tps = cfg.batch_size * cfg.block_size / dt
    peak = peak_flops(rt, cfg.peak_flops)
    mfu = peak.mfu(model.flops_per_token() * tps)
    shown = f"{mfu * 100:.1f}%" if mfu is not None else f"n/a (peak {peak.source})"
    print(f"train: {dt * 1000:.2f} ms/iter (median of {cfg.steps}), {tps:,.0f} tok/s, mfu {shown}")
    result = {"ms_per_iter": dt * 1000, "tokens_per_sec": tps, "mfu": mfu}
    _emit(cfg, rt, model, {**result, "achieved_flops": model.flops_per_token() * tps, "peak_flops": peak.flops})
    return result


def bench_sample(cfg: BenchConfig, rt: Runtime, model: GPT) -> dict[str, float]:
    """New tokens per second with the KV cache and with the window recomputed per token."""
    model.eval()
    prompt = torch.zeros((cfg.num_samples, 1), dtype=torch.long, device=rt.device)
    result = {}
    for use_cache in (True, False):
        times = []
        for r in range(cfg.repeats):
            g = torch.Generator(device=rt.device).manual_seed(cfg.seed + r)
            _sync(rt)
            t0 = time.perf_counter()
            with torch.inference_mode(), rt.autocast():
                model.generate(prompt, cfg.max_new_tokens, top_k=200, generator=g, use_cache=use_cache)
            _sync(rt)
            times.append(time.perf_counter() - t0)
        tps = cfg.num_samples * cfg.max_new_tokens / statistics.median(times)
        result["kv_cache" if use_cache else "recompute"] = tps
        print(f"sample ({'KV cache' if use_cache else 'recompute'}): {tps:,.1f} tok/s (median of {cfg.repeats})")
    print(f"KV cache speed-up: {result['kv_cache'] / result['recompute']:.1f}x")
    _emit(cfg, rt, model, {"kv_cache_tokens_per_sec": result["kv_cache"],
                           "recompute_tokens_per_sec": result["recompute"],
                           "speedup": result["kv_cache"] / result["recompute"]})  # fmt: skip
    return result


def bench_peak(rt: Runtime) -> dict[str, float | None]:
    """Measure the matmul peak that MFU divides by, and remember it for this machine."""
    peak = peak_flops(rt, remeasure=True)
    shown = f"{peak.flops / 1e12:.3g} TFLOP/s" if peak.flops else "not kept"
    print(f"peak: {shown} ({peak.source})")
    return {"peak_flops": peak.flops}


def bench(cfg: BenchConfig) -> dict[str, float]:
    """Run the benchmark cfg.what and return its figures."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    try:
        if cfg.what == "peak":
            return bench_peak(rt)
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model_config()).to(rt.device)
        print(f"{cfg.what}: {model.get_num_params() / 1e6:.2f}M parameters on {rt.device} ({rt.dtype})")
        return bench_train(cfg, rt, model) if cfg.what == "train" else bench_sample(cfg, rt, model)
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        bench(load_config(BenchConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
