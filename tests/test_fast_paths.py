"""The fast paths, checked for correctness on a CPU: a training step that never waits for the
device, the input pipeline, optimizer steps skipped on the device. (Their speed is measured by
bench.py and docs/benchmarks.md, not here.)"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptsmith import data as ds
from gptsmith import model as model_module
from gptsmith import optim, parallel, runtime, trainer
from gptsmith.configurator import UserError
from gptsmith.model import GPTConfig, RMSNorm
from gptsmith.trainer import train
from helpers import nan_after

# Every way Python code can pull a tensor's value to the host: on a GPU each one waits for the device.
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gradient_accumulation_steps": 2, "dropout": 0.1},
        {"optimizer": "muon"},
        {"skip_nonfinite": True},
        {"dtype": "float16"},
        {"parallel": "fsdp"},  # a process group of one: the distributed branch, its all-reduce included
    ],
    ids=["default", "accumulation", "muon", "skip_nonfinite", "float16", "fsdp"],
)
def test_a_step_that_logs_nothing_never_waits_for_the_device(tiny_cfg, monkeypatch, overrides):
    """No .item() and the like inside a training step; what the host learns of a step (loss,
    health, a stop agreed over ranks) it reads one step later, when the device is long done."""
    current: dict[str, int | None] = {"step": None}
    in_flush = [False]
    syncs, late_reads = [], []

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            if current["step"] is not None and not in_flush[0]:
                syncs.append((current["step"], name))
            return real(self, *args, **kwargs)

        return wrapper

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    real_step, real_flush = trainer.train_step, trainer.StepHealth.flush

    def step(run, state):
        current["step"] = state.iter_num
        try:
            return real_step(run, state)
        finally:
            current["step"] = None

    def flush(self):
        if current["step"] is not None and self.pending is not None:
            late_reads.append((current["step"], self.pending[0]))
        in_flush[0] = True
        try:
            return real_flush(self)
        finally:
            in_flush[0] = False

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer.StepHealth, "flush", flush)
    # A CPU's flags are read on the host (free there); this runs the GPU's path, decided on the device.
    monkeypatch.setattr(optim, "HOST_READABLE", set())
    cfg = tiny_cfg(max_iters=6, eval_interval=1000, log_interval=1000, **overrides)
    summary = train(cfg)
    assert summary["iter"] == 6
    assert syncs == []
    # Inside step s the host reads step s - 1's report, never its own.
    assert late_reads == [(s, s - 1) for s in range(1, 6)]


def test_logging_reads_the_step_just_taken(tiny_cfg, capsys):
    """At a log step the host does wait, for that step's own loss: the line shows it, not the previous one."""
    cfg = tiny_cfg(max_iters=4, eval_interval=1000, log_interval=2)
    train(cfg)
    out = capsys.readouterr().out
    assert "iter 2: loss" in out and "iter 4: loss" in out


@pytest.mark.parametrize("on_device", [True, False], ids=["device-path", "host-path"])
@pytest.mark.parametrize("make", ["adamw", "muon", "combined"])
def test_a_step_skipped_on_the_device_changes_nothing(make, on_device, monkeypatch):
    if on_device:  # the GPU's path: the optimizer reads the flag, the host never does
        monkeypatch.setattr(optim, "HOST_READABLE", set())
        monkeypatch.setattr(torch.Tensor, "item", _never)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    if make == "adamw":
        opt = optim.adamw(model.parameters(), 0.1, 1e-2, (0.9, 0.95), "cpu")
    elif make == "muon":
        opt = optim.Muon([model[0].weight, model[1].weight], lr=0.02, weight_decay=0.1)
    else:
        opt = optim.CombinedOptimizer(
            optim.Muon([model[0].weight, model[1].weight], lr=0.02),
            optim.adamw([model[0].bias], 0.0, 1e-2, (0.9, 0.95), "cpu"),
        )
    assert opt._step_supports_amp_scaling  # so step_unless never reads the flag on the host

    def grads():
        for p in model.parameters():
            p.grad = torch.randn_like(p)

    grads()
    optim.step_unless(opt, torch.tensor(False))  # a real step first, so there are moments to keep
    snapshot = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    grads()
    for p in model.parameters():
        p.grad.view(-1)[0] = float("nan")
    optim.step_unless(opt, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))
    for before, after in zip(states, opt.state.values()):
        assert all(torch.equal(v, after[k]) for k, v in before.items())  # moments and step counts too
    grads()
    optim.step_unless(opt, torch.tensor(False))
    assert not torch.equal(snapshot[0], model[0].weight)


def test_muon_with_the_flag_clear_steps_exactly_as_without_it():
    """The device-side skip must not change a normal step by a single bit (resume and golden runs rely on it)."""
    results = []
    for flag in (None, torch.tensor(0.0)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(16, 8))
        opt = optim.Muon([w], lr=0.02, weight_decay=0.1)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.found_inf = flag
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(*results)


def test_get_batch_is_one_contiguous_window_per_row():
    data = np.arange(100, dtype=np.uint16)
    x, y = ds.get_batch(data, np.array([3, 50]), 5, "cpu")
    assert x.tolist() == [[3, 4, 5, 6, 7], [50, 51, 52, 53, 54]]
    assert y.tolist() == [[4, 5, 6, 7, 8], [51, 52, 53, 54, 55]]
    assert x.dtype == y.dtype == torch.long
    # One (B, T+1) buffer: x and y are views of it, so one host-to-device copy moves both.
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    targeted = ds.TargetedTokens(np.arange(40, dtype=np.uint16), -np.arange(40, dtype=np.int16))
    x, y = ds.get_batch(targeted, np.array([0, 10, -1]), 4, "cpu")
    assert x.tolist()[1] == [10, 11, 12, 13] and y.tolist()[1] == [-10, -11, -12, -13]
    assert y.tolist()[2] == [-1] * 4  # padding: no targets
    x, y = ds.get_batch(targeted, np.array([0, 10]), 4, "cpu")
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one (2, B, T) buffer


MODERN = dict(pos_emb="rope", norm="rmsnorm", activation="swiglu", qk_norm=True, n_kv_head=1, tie_weights=False,
              logit_softcap=30.0)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, MODERN], ids=["gpt2", "modern"])
def test_the_compiled_model_is_one_graph_and_trains_as_eager(tiny_cfg, options):
    """compile=True: fullgraph=True, dynamic=False (a graph break or a recompile per shape would be an
    error or show here), and the same losses as eager up to rounding."""
    cfg = tiny_cfg(max_iters=3, eval_interval=3, n_layer=1, **options)
    eager = train(cfg)
    compiled = train(dataclasses.replace(cfg, compile=True, out_dir=cfg.out_dir + "-compiled"))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_under_fsdp_each_block_is_compiled_before_sharding(tiny_cfg, monkeypatch):
    compiled = []
    real = parallel.compile_blocks

    def spy(model, mode):
        real(model, mode)
        compiled.extend(getattr(b, "_compiled_call_impl", None) is not None for b in model.transformer.h)

    monkeypatch.setattr(parallel, "compile_blocks", spy)
    cfg = tiny_cfg(max_iters=2, eval_interval=2, parallel="fsdp")
    eager = train(cfg)
    summary = train(dataclasses.replace(cfg, compile=True, out_dir=cfg.out_dir + "-compiled"))
    assert compiled == [True, True]
    assert summary["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)


def test_compile_mode_reaches_torch_compile_and_cuda_graphs_stay_out_of_ddp_and_fsdp(tiny_cfg, monkeypatch, capsys):
    """compile_mode=reduce-overhead (config/shakespeare_char.py's) reaches torch.compile in one process;
    under FSDP (and DDP: compile_mode_for) the CUDA-graph modes fall back to default, with a note."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw["mode"]) or model)
    monkeypatch.setattr(parallel, "compile_blocks", lambda model, mode: modes.append(f"blocks {mode}"))
    cfg = tiny_cfg(max_iters=1, eval_interval=1, compile=True, compile_mode="reduce-overhead")
    train(cfg)
    assert modes == ["reduce-overhead"] and "compiling in 'default'" not in capsys.readouterr().out
    train(dataclasses.replace(cfg, parallel="fsdp", out_dir=cfg.out_dir + "-fsdp"))
    assert modes == ["reduce-overhead", "blocks default"]
    assert "compile_mode='reduce-overhead' records CUDA graphs, not with FSDP" in capsys.readouterr().out
    for mode, distributed in [
        ("reduce-overhead", "default"),
        ("max-autotune", "default"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
        ("default", "default"),
    ]:
        ddp = dataclasses.replace(cfg, compile_mode=mode)
        assert (ddp.compile_mode_for(False), ddp.compile_mode_for(True)) == (mode, distributed)
    with pytest.raises(UserError, match="compile_mode must be one of"):
        tiny_cfg(compile_mode="fastest")


# --- the attention kernels -------------------------------------------------------------------


def test_a_forced_attention_backend_holds_for_the_run_and_is_restored_after(tiny_cfg, monkeypatch):
    seen = []
    real_step = trainer.train_step

    def step(run, state):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real_step(run, state)

    monkeypatch.setattr(trainer, "train_step", step)
    before = torch.backends.cuda.flash_sdp_enabled()
    train(tiny_cfg(max_iters=2, eval_interval=2, sdpa_backend="math"))
    assert set(seen) == {(False, True)}  # math only
    assert torch.backends.cuda.flash_sdp_enabled() == before
    seen.clear()
    train(tiny_cfg(max_iters=2, eval_interval=2))  # auto on a CPU: torch's own choice, nothing forced
    assert set(seen) == {(before, True)}


def test_gpu_only_attention_backends_are_refused_on_a_cpu(tiny_cfg):
    with pytest.raises(UserError, match="sdpa_backend=cudnn needs a CUDA GPU"):
        train(tiny_cfg(sdpa_backend="cudnn"))
    with pytest.raises(UserError, match="sdpa_backend must be one of"):
        tiny_cfg(sdpa_backend="fastest")


# --- MFU's peak ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GB200", 2500e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_known_gpus_get_their_own_datasheet_peak(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.peak_flops(runtime.Runtime("cuda", "bfloat16")).flops == peak


def test_no_gpu_name_in_the_peak_table_is_shadowed_by_an_earlier_one():
    keys = [key for key, _, _ in runtime.GPU_PEAK_FLOPS]
    for i, key in enumerate(keys):
        assert not any(earlier in key for earlier in keys[:i]), key


# --- dtype=auto on a CPU -----------------------------------------------------------------------


def _never(*args, **kwargs):
    raise AssertionError("no measurement expected")


def test_auto_dtype_on_a_cpu_without_bfloat16_units_is_float32_without_measuring(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(runtime, "_time_block", _never)
    dtype, why = runtime.cpu_training_dtype(GPTConfig(n_embd=768), batch_size=8)
    assert dtype == "float32" and "no bfloat16 units" in why


@pytest.mark.parametrize("speedup,expected", [(2.0, "bfloat16"), (1.1, "float32")])
def test_auto_dtype_on_a_bfloat16_cpu_measures_once_and_keeps_the_verdict(monkeypatch, speedup, expected):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    toy = GPTConfig(n_embd=32, n_head=2, block_size=32)
    monkeypatch.setattr(runtime, "_time_block", _never)
    assert runtime.cpu_training_dtype(toy, batch_size=8)[0] == "float32"  # too small to try
    monkeypatch.setattr(runtime, "_time_block", lambda config, rows: (speedup, 1.0))
    config = GPTConfig(n_embd=512, n_head=8, block_size=128, n_layer=1)
    dtype, why = runtime.cpu_training_dtype(config, batch_size=4, remeasure=True)
    assert dtype == expected and f"{speedup:.2f}x" in why
    monkeypatch.setattr(runtime, "_time_block", _never)
    assert runtime.cpu_training_dtype(config, batch_size=4)[0] == expected  # from the cache


def test_the_block_probe_times_both_dtypes_without_moving_the_random_streams():
    config = GPTConfig(n_embd=64, n_head=2, block_size=16, n_layer=1, pos_emb="rope", norm="rmsnorm", qk_norm=True)
    state = torch.get_rng_state()
    fp32, bf16 = runtime._time_block(config, 2)
    assert fp32 > 0 and bf16 > 0
    assert torch.equal(state, torch.get_rng_state())


def test_a_run_with_dtype_auto_trains_in_the_chosen_dtype(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(runtime, "_time_block", lambda config, rows: (3.0, 1.0))
    seen = []
    real = torch.autocast.__init__

    def spy(self, device_type, dtype=None, *args, **kwargs):
        seen.append(dtype)
        real(self, device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", spy)
    summary = train(tiny_cfg(n_embd=256, n_head=4, max_iters=2, eval_interval=2))
    assert "dtype=auto chose bfloat16" in capsys.readouterr().out
    assert torch.bfloat16 in seen and math.isfinite(summary["val_loss"])


@pytest.mark.parametrize("how", ["autocast", "bfloat16 weights"])
def test_attention_on_a_cpu_computes_in_float32_whatever_the_compute_dtype(how, monkeypatch):
    """torch's CPU attention kernels are several times slower in bfloat16 than in float32 at our head
    sizes, so model.attention hands them float32 (and gives back the caller's dtype): the same values,
    forward and backward, as float32 attention of the same bfloat16 inputs."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16).bfloat16().requires_grad_() for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()  # grouped-query: 2 kv heads
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        y = model_module.attention(q, k2, v2)
    assert y.dtype == torch.bfloat16 and seen == [(torch.float32,) * 3 + (False,)]
    y.float().sum().backward()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k2, v2))
    expected = real(qf, kf, vf, is_causal=True, enable_gqa=True)
    assert torch.equal(y, expected.bfloat16())
    expected.sum().backward()
    for ours, ref in ((q, qf), (k2, kf), (v2, vf)):
        assert torch.equal(ours.grad, ref.grad.bfloat16())
    seen.clear()
    model_module.attention(qf, kf, vf)  # float32 without autocast: straight through
    assert seen == [(torch.float32,) * 3 + (False,)]


def test_qk_norm_under_cpu_autocast_takes_the_fused_kernel_and_matches_rmsnorm():
    norm = RMSNorm(16, eps=1e-5)
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(norm(x), torch.nn.RMSNorm(16, eps=1e-5)(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it falls back to the unfused kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16


# --- on a GPU (skipped without one; .ci/gpu-bench runs them) --------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("overrides", [{}, {"optimizer": "muon", "gradient_accumulation_steps": 2}])
def test_on_cuda_a_step_that_logs_nothing_never_synchronizes(tiny_cfg, monkeypatch, overrides):
    """CUDA's own sync detector: any synchronizing call inside a non-logging step raises."""
    real_step = trainer.train_step

    def step(run, state):
        if state.iter_num < 2:  # the first steps allocate pinned buffers and warm up kernels
            return real_step(run, state)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(run, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(trainer, "train_step", step)
    cfg = tiny_cfg(device="cuda", dtype="bfloat16", max_iters=8, eval_interval=1000, log_interval=1000, **overrides)
    assert train(cfg)["iter"] == 8


@pytest.mark.cuda
def test_on_cuda_skipping_a_nonfinite_step_needs_no_sync(tiny_cfg, monkeypatch):
    nan_after(monkeypatch, 4)
    cfg = tiny_cfg(device="cuda", max_iters=6, eval_interval=6, skip_nonfinite=True)
    summary = train(cfg)
    assert summary["iter"] == 6 and math.isfinite(summary["val_loss"])


# --- Muon under DDP: each process orthogonalises its share ----------------------------------------

MUON_SHAPES = [(16, 8), (8, 16), (16, 8), (32, 32), (16, 8)]


def _muon_steps(steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in MUON_SHAPES]
    opt = optim.Muon(params, lr=0.02, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


def _muon_rank(rank: int, world: int, init: str, out: str) -> None:
    runtime.init_group("gloo", "cpu", init_method=init, rank=rank, world_size=world)
    calls = [0]
    real = optim.newton_schulz

    def counting(G, *args, **kwargs):
        calls[0] += len(G) if G.dim() == 3 else 1  # matrices orthogonalised (a stack holds several)
        return real(G, *args, **kwargs)

    optim.newton_schulz = counting
    params = _muon_steps()
    torch.save({"params": params, "calls": calls[0]}, f"{out}.{rank}")
    torch.distributed.barrier()  # neither leaves while the other may still talk to it (gloo aborts then)
    torch.distributed.destroy_process_group()


def test_muon_under_ddp_shares_newton_schulz_out_and_gets_the_same_weights(tmp_path):
    alone = _muon_steps()
    init = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_muon_rank, args=(2, init, str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(alone, result["params"]))  # bit for bit
    calls = [r["calls"] for r in results]
    assert sum(calls) == 3 * len(MUON_SHAPES) and max(calls) < 3 * len(MUON_SHAPES)  # shared out, not repeated


def test_training_through_the_chunked_head_and_loss_matches_the_plain_path(tiny_cfg, monkeypatch):
    """The trainer asks for no logits; with the threshold at 0 every step and evaluation takes the
    chunked path (GPT-2's vocabulary would by itself): the same run up to float rounding."""
    cfg = tiny_cfg(max_iters=6, eval_interval=3)
    plain = train(cfg)
    monkeypatch.setattr(model_module, "CHUNKED_LOSS_BYTES", 0)
    chunked = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-chunked"))
    assert chunked["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-4)
    assert chunked["val_loss"] != plain["val_loss"] or chunked["train_loss"] != plain["train_loss"]  # it did run


def test_under_fsdp_the_whole_model_never_goes_to_the_device_before_sharding(tiny_cfg, monkeypatch):
    """fully_shard moves each block as it shards it: the device holds the model only sharded (plus a block)."""
    events = []
    real_to, real_shard = torch.nn.Module.to, parallel.shard

    def to(self, *args, **kwargs):
        if isinstance(self, model_module.GPT):
            events.append("whole model to device")
        return real_to(self, *args, **kwargs)

    def shard(model, rt):
        events.append("shard")
        real_shard(model, rt)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(parallel, "shard", shard)
    train(tiny_cfg(max_iters=1, eval_interval=1, parallel="fsdp"))
    assert events[0] == "shard"
    events.clear()
    train(tiny_cfg(max_iters=1, eval_interval=1, out_dir=tiny_cfg().out_dir + "-ddp"))  # one process: moved whole
    assert events[0] == "whole model to device"


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", ["own", "reduce-overhead"])
def test_on_cuda_the_graph_captured_decode_step_gives_the_eager_tokens_without_syncs(monkeypatch, cuda_graph):
    """compile_decode on CUDA: each token one CUDA graph replay, recorded by generate (DecodeGraph, the
    default) or by torch.compile's mode='reduce-overhead'; past block_size the window restarts (a prefill)
    and decoding goes on in the same graph. Greedy and sampled tokens are eager decoding's."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # bit-comparable to eager
    torch.manual_seed(0)
    model = model_module.GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).cuda().eval()
    idx = torch.randint(0, 50, (2, 3), device="cuda")
    runs = [dict(temperature=0.0), dict(temperature=0.8, top_k=5)]

    def generate(run):
        return model.generate(idx, 80, generator=torch.Generator(device="cuda").manual_seed(5), **run)

    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: replays.append(g) or real_replay(g))
    with torch.inference_mode():
        expected = [generate(run) for run in runs]
        model.compile_decode(cuda_graph=cuda_graph)
        for run, tokens in zip(runs, expected):
            assert torch.equal(generate(run), tokens)  # records the graph
            replays.clear()
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = generate(run)  # replays it
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(again, tokens)
            if cuda_graph == "own":  # 80 tokens from a window of 32 restarting with 16: 4 prefills
                assert len(replays) == 80 - 4
