"""One place that decides where and how we compute: device, dtype, distributed rank, autocast."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptsmith.configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Dense (no sparsity) peak FLOP/s of GPUs we know, for bf16/fp16 and for fp32 (TF32 on tensor cores),
# from the vendors' datasheets (which quote twice these with 2:4 sparsity). Matched against
# torch.cuda.get_device_name() as substrings in order, so a name that contains another comes first
# ("GB200" before "B200", "H100 NVL" and "H100 PCIe" before "H100").
GPU_PEAK_FLOPS = [
    ("GB200", 2500e12, 1250e12),  # one Blackwell GPU of a GB200 superchip
    ("B200", 2250e12, 1100e12),
    ("GH200", 989e12, 494e12),  # Hopper, as the H100 SXM
    ("H200", 989e12, 494e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # the SXM module: "NVIDIA H100 80GB HBM3"
    ("H800", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


@dataclass
class Runtime:
    """Where this process computes and how: device, dtype and its place in a distributed job."""

    device: str  # e.g. 'cuda:0', 'cpu', 'mps'
    dtype: str  # 'float32' | 'bfloat16' | 'float16'
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # The weights forward runs through are in dtype already (FSDP's mixed-precision policy, or
    # master_weights' bfloat16 copies): autocast would only add casts.
    weights_in_dtype: bool = False
    dtype_reason: str = ""  # why dtype=auto chose dtype, when it took a measurement to choose
    owns_group: bool = False  # setup_runtime made the process group, so teardown ends it
    attention: Any = None  # the sdpa_kernel context setup_runtime entered (see choose_attention); teardown leaves it
    # What teardown must release before the process group ends (see parallel.wrap_ddp), last first.
    before_teardown: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def ptdtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()

    @property
    def master(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and metrics."""
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing it); CPU work is done when its call returns."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def autocast(self) -> Any:
        """Mixed precision for the forward pass; a no-op in float32 or when the weights are in dtype already."""
        if self.dtype == "float32" or self.weights_in_dtype:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, needed (and enabled) only for float16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == "float16")


def resolve_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must exist."""
    if not DEVICE_PATTERN.match(device):
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA GPU is available; use --device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available; use --device=cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 where the GPU supports it, float16 on older CUDA GPUs, else float32
    (for training on a CPU with bfloat16 units, cpu_training_dtype may then pick bfloat16)."""
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


TORCH_FLOOR = (2, 6)  # fully_shard (FSDP2) became public in torch 2.6, DTensor in 2.5


def check_torch_version(version: str | None = None) -> None:
    """Refuse a torch older than the floor pyproject.toml states, with one line saying what to do."""
    version = version or torch.__version__
    numbers = tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])
    if numbers < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise UserError(f"gptsmith needs torch >= {floor}, this is torch {version}; install a newer torch first")


def setup_runtime(
    device: str = "auto", dtype: str = "auto", backend: str = "auto", group: bool = False, sdpa_backend: str = "auto"
) -> Runtime:
    """Pick device, dtype and attention kernels, and join the process group when launched by torchrun.

    group=True makes a process group of one when not launched by torchrun (FSDP needs one).
    """
    check_torch_version()
    rank = int(os.environ.get("RANK", -1))
    if rank == -1:
        dev = resolve_device(device)
        rt = Runtime(device=dev, dtype=resolve_dtype(dtype, dev))
        if group and not torch.distributed.is_initialized():
            init_group(_backend(backend, dev), dev, store=torch.distributed.HashStore(), rank=0, world_size=1)
            rt.owns_group = True
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        dev = resolve_device(device)
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        owns_group = not torch.distributed.is_initialized()  # a caller's own group stays theirs
        if owns_group:
            init_group(_backend(backend, dev), dev, **_restart_safe_rendezvous(rank, world_size))
        rt = Runtime(dev, resolve_dtype(dtype, dev), rank, local_rank, world_size, owns_group=owns_group)
    if rt.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    rt.attention = choose_attention(sdpa_backend, rt.device)
    return rt


SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def choose_attention(name: str, device: str) -> Any:
    """Enter (for the whole run) the scaled_dot_product_attention kernels to use, in order of preference.

    'auto' on a Hopper or newer GPU prefers cuDNN's fused attention, then flash, then memory-efficient,
    then math: torch's own order puts cuDNN last. Elsewhere 'auto' leaves torch's choice (on a CPU:
    its flash kernel where the inputs allow, else math). A named backend is forced: inputs it cannot
    take then fail with torch's message rather than silently running slower."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in SDPA_BACKENDS:
        raise UserError(f"sdpa_backend={name!r} is not one of {', '.join(SDPA_BACKENDS)}")
    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    on_gpu = device.startswith("cuda")
    if name == "auto":
        if not (on_gpu and torch.cuda.get_device_capability(device) >= (9, 0)):
            return None
        order = [kinds[k] for k in ("cudnn", "flash", "efficient", "math")]
    elif not on_gpu and name not in ("flash", "math"):
        raise UserError(f"sdpa_backend={name} needs a CUDA GPU; on {device} there are flash and math")
    else:
        order = [kinds[name]]
    context = sdpa_kernel(order, set_priority=True)
    context.__enter__()
    return context


def _backend(backend: str, device: str) -> str:
    """'auto' -> nccl on CUDA, gloo elsewhere."""
    if backend != "auto":
        return backend
    return "nccl" if device.startswith("cuda") else "gloo"


def _restart_safe_rendezvous(rank: int, world_size: int) -> dict[str, Any]:
    """Arguments for init_process_group that survive torchrun's restarts (--max-restarts).

    By default torchrun lends its workers its own store (TORCHELASTIC_USE_AGENT_STORE=True), the
    same one in every restart round, and the process group writes the same keys into it each
    round: restarted workers read the addresses of the workers that died and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused"). Keys under a prefix per restart
    round keep the rounds apart. Without torchelastic's store: {} (env:// as usual).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": torch.distributed.PrefixStore(f"gptsmith/restart{attempt}", store),
        "rank": rank,
        "world_size": world_size,
    }


def init_group(backend: str, device: str, **kwargs: Any) -> None:
    """init_process_group (every process group gptsmith makes); by default from torchrun's environment
    variables (env://). A caller making its own group for gptsmith to use should make it here too."""
    # torch.distributed.nn binds group.WORLD into default arguments when it is first imported. DDP
    # and FSDP import it (through torch._dynamo) after the group exists, and then those defaults
    # keep the group alive past destroy_process_group: its gloo threads run on while the
    # interpreter shuts down, where a C++ thread that touches Python aborts the process. Imported
    # first, the defaults hold None and teardown really ends the group.
    import torch.distributed.nn  # noqa: F401

    device_id = None
    if device.startswith("cuda"):  # with an index: init_process_group refuses "cuda" alone (one process, no torchrun)
        device_id = torch.device(device) if ":" in device else torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group(backend=backend, device_id=device_id, **kwargs)


def teardown(rt: Runtime) -> None:
    """Leave the process group setup_runtime joined (one the caller made is left to the caller)
    and restore torch's attention kernel choice."""
    while rt.before_teardown:
        rt.before_teardown.pop()()
    if rt.attention is not None:
        rt.attention.__exit__(None, None, None)
        rt.attention = None
    if rt.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- dtype=auto on a CPU: bfloat16 where the CPU has units for it and it pays off -----------------

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}  # /proc/cpuinfo: Intel AMX, AVX-512 BF16; Arm's BF16
BF16_MIN_WIDTH = 64  # below this n_embd (toy models) float32 without timing anything
BF16_MIN_SPEEDUP = 1.2  # bfloat16 rounds more: it must clearly pay (the speedrun's block: 1.26-1.64x, six probes)


@functools.cache  # read once: Muon's ns_dtype asks for every matrix at every step
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 'flags', Arm 'Features'); empty elsewhere."""
    return frozenset((_cpuinfo("flags") or _cpuinfo("Features") or "").split())


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 units (BF16_CPU_FLAGS), where bfloat16 matmuls are native."""
    return bool(BF16_CPU_FLAGS & cpu_flags())


def cpu_training_dtype(config: Any, batch_size: int, remeasure: bool = False) -> tuple[str, str]:
    """(dtype, why) for training the model of config (a GPTConfig) with dtype=auto on this CPU.

    bfloat16 autocast only pays where the CPU has bfloat16 units (AMX, AVX-512 BF16: 3-8x
    float32's matmul rate) and the matmuls are big enough to pay for the casts around them: on a
    Zen 5 EPYC one block of the 64-wide speedrun runs 1.3-1.6x as fast in bfloat16, of the
    384-wide baby GPT 2.3x (attention staying float32, model.attention). So: float32 without
    such units or below BF16_MIN_WIDTH, else one block's forward and backward timed in both
    dtypes, once per machine and shape (kept beside the peak FLOP/s), bfloat16 if it is at least
    BF16_MIN_SPEEDUP times as fast."""
    if not cpu_has_bf16():
        return "float32", "this CPU has no bfloat16 units"
    if config.n_embd < BF16_MIN_WIDTH:
        return "float32", f"n_embd {config.n_embd} < {BF16_MIN_WIDTH}: too small for bfloat16 to pay off"
    rows = max(1, min(batch_size, 2048 // config.block_size))  # ~2k tokens: big enough, quick to time
    key = (
        # (v2: attention float32 under autocast, which changed what a block's bfloat16 time is)
        f"cpu dtype v2: {_cpu()}, torch {torch.__version__}, "
        f"block {config.n_embd}/{config.n_head}/{config.kv_heads}/{config.activation}/{config.norm}/"
        f"{config.pos_emb}/{config.qk_norm}, {rows}x{config.block_size} tokens"
    )

    def measure() -> tuple[float, float]:
        before, t0 = _cpu_ticks(), time.perf_counter()
        fp32, bf16 = _time_block(config, rows)
        speedup = fp32 / bf16
        return speedup, _others_share(before, time.perf_counter() - t0)

    speedup, _, where = _remembered(key, measure, remeasure)  # a busy machine's figure is used, not kept
    dtype = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return dtype, f"a block runs {speedup:.2f}x as fast in bfloat16 as in float32 ({where})"


def choose_training_dtype(rt: Runtime, requested: str, config: Any, batch_size: int) -> None:
    """For training with dtype=auto on a CPU, set rt.dtype (and rt.dtype_reason) to what
    cpu_training_dtype finds for the model of config. Collective when distributed: rank 0
    decides for all, as ranks timing at once would disturb each other and could disagree."""
    if requested != "auto" or rt.device_type != "cpu":
        return
    choice = [cpu_training_dtype(config, batch_size) if rt.master else None]
    if rt.distributed:
        torch.distributed.broadcast_object_list(choice, src=0)
    rt.dtype, rt.dtype_reason = choice[0]


def _time_block(config: Any, rows: int, reps: int = 5) -> tuple[float, float]:
    """Median seconds of one transformer block's forward and backward on random input (rows, T, C),
    (in float32, under bfloat16 autocast): the two in turn, so a machine speeding up or slowing
    down while it measures weighs on both alike."""
    from gptsmith.model import Block, rope_tables

    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    with torch.random.fork_rng(devices=[]):  # building and probing must not move the training RNG
        torch.manual_seed(0)
        block = Block(dataclasses.replace(config, dropout=0.0))
        x = torch.randn(rows, config.block_size, config.n_embd, requires_grad=True)
        rope = rope_tables(config.block_size, config.n_embd // config.n_head) if config.pos_emb == "rope" else None
        for rep in range(reps + 1):  # the first round warms up kernels and caches
            for dtype, kept in times.items():
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    y = block(x, rope=rope)
                y.float().sum().backward()
                if rep:
                    kept.append(time.perf_counter() - t0)
    fp32, bf16 = (sorted(kept)[reps // 2] for kept in times.values())
    return fp32, bf16


@dataclass
class Peak:
    """The peak FLOP/s that MFU divides by, and where it came from; flops None = unknown (MFU not shown)."""

    flops: float | None
    source: str

    def mfu(self, achieved_flops: float) -> float | None:
        return achieved_flops / self.flops if self.flops else None


def peak_flops(rt: Runtime, configured: float = 0.0, remeasure: bool = False) -> Peak:
    """The device's peak FLOP/s in rt.dtype: configured, else a known GPU's datasheet, else
    measured with a large matmul once per machine and remembered in a cache file, so MFU is
    comparable between runs. A measurement taken while other processes kept the CPU busy is
    thrown away (it would understate the peak and inflate MFU): MFU is then unknown.
    remeasure=True ignores the cache (python bench.py --what=peak)."""
    if configured > 0:
        return Peak(configured, "configured")
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, half, fp32 in GPU_PEAK_FLOPS:
            if key in name:
                return Peak(half if rt.dtype != "float32" else fp32, f"datasheet, {key}")
    flops, others, where = _remembered(_machine_key(rt), lambda: measure_matmul_flops(rt.device, rt.ptdtype), remeasure)
    if others > BUSY_LIMIT:
        return Peak(
            None,
            f"unknown: other processes used {others:.0%} of the CPUs while measuring; "
            "set peak_flops, or run again when the machine is idle",
        )
    return Peak(flops, where)


BUSY_LIMIT = 0.1  # the share of the machine's CPU time others may use during the probe


def _remembered(key: str, measure: Callable[[], tuple[float, float]], remeasure: bool) -> tuple[float, float, str]:
    """(value, share of the CPUs others used while measuring it, where it came from) of a measurement
    that is taken once per machine and kept under key in the cache file: measure() runs only when
    the cache has none (or remeasure), and what it returns is kept only if others used at most
    BUSY_LIMIT of the CPUs meanwhile (a busy machine's figure would be off)."""
    path = peak_cache_path()
    cached = _read_json(path).get(key)
    if isinstance(cached, (int, float)) and cached > 0 and not remeasure:
        return float(cached), 0.0, f"measured earlier on this machine, {path}"
    value, others = measure()
    if others > BUSY_LIMIT:
        return value, others, "measured now"
    _write_json(path, {**_read_json(path), key: value})
    return value, others, f"measured now, kept in {path}"


def peak_cache_path() -> Path:
    """Where measured peaks are kept: $GPTSMITH_CACHE_DIR, else the user's cache folder."""
    root = (
        os.environ.get("GPTSMITH_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptsmith"
    )
    return Path(root) / "peak_flops.json"


def _machine_key(rt: Runtime) -> str:
    """What the measured peak depends on: the processor, the threads we use, dtype and torch."""
    if rt.device_type == "cuda":
        device = torch.cuda.get_device_name(rt.device)
    else:
        device = _cpu()
    return f"{rt.device_type}: {device}, {rt.dtype}, torch {torch.__version__}"


def _cpu() -> str:
    """The processor and the threads we use: what CPU measurements depend on besides dtype and torch."""
    model = _cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{model} x{os.cpu_count()}, {torch.get_num_threads()} threads"


def _cpuinfo(field: str) -> str | None:
    """The value of a field of the first processor in /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Best effort: a read-only home only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks this process used), from /proc; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime


def measure_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> tuple[float, float]:
    """(best FLOP/s of an n x n matmul over a short burst, the share of the CPUs other processes
    used meanwhile). Its random inputs come from a private generator: measuring must not move
    the random streams that dropout draws from."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    (a @ b).sum().item()  # warm up: thread pools, kernels
    before, t_start = _cpu_ticks(), time.perf_counter()
    best = float("inf")
    while time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for asynchronous devices
        best = min(best, time.perf_counter() - t0)
    others = _others_share(before, time.perf_counter() - t_start) if device == "cpu" else 0.0
    return 2 * n**3 / best, others


def _others_share(before: tuple[int, int] | None, wall: float) -> float:
    """The share of the machine's CPU time that other processes used since before = _cpu_ticks()."""
    after = _cpu_ticks()
    if before is None or after is None:
        return 0.0
    capacity = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / capacity
