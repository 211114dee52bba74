"""One place that decides where and how we compute: device, dtype, distributed rank, autocast."""

from __future__ import annotations

import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from configurator import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Dense (no sparsity) peak FLOP/s of GPUs we know, for bf16/fp16 and for fp32 (TF32 on tensor cores).
# Matched against torch.cuda.get_device_name() in order, so put the more specific names first.
GPU_PEAK_FLOPS = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
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
    cast_by_fsdp: bool = False  # FSDP's mixed-precision policy casts the parameters, so no autocast
    owns_group: bool = False  # setup_runtime made the process group, so teardown ends it

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

    def autocast(self) -> Any:
        """Mixed precision for the forward pass; a no-op in float32 or when FSDP does the casting."""
        if self.dtype == "float32" or self.cast_by_fsdp:
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
    """'auto' -> bfloat16 where the GPU supports it, float16 on older CUDA GPUs, else float32."""
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def setup_runtime(device: str = "auto", dtype: str = "auto", backend: str = "auto", group: bool = False) -> Runtime:
    """Pick device and dtype, and join the process group when launched by torchrun.

    group=True makes a process group of one when not launched by torchrun (FSDP needs one).
    """
    rank = int(os.environ.get("RANK", -1))
    if rank == -1:
        dev = resolve_device(device)
        rt = Runtime(device=dev, dtype=resolve_dtype(dtype, dev))
        if group and not torch.distributed.is_initialized():
            _init_group(_backend(backend, dev), dev, store=torch.distributed.HashStore(), rank=0, world_size=1)
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
            _init_group(_backend(backend, dev), dev)
        rt = Runtime(dev, resolve_dtype(dtype, dev), rank, local_rank, world_size, owns_group=owns_group)
    if rt.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    return rt


def _backend(backend: str, device: str) -> str:
    """'auto' -> nccl on CUDA, gloo elsewhere."""
    if backend != "auto":
        return backend
    return "nccl" if device.startswith("cuda") else "gloo"


def _init_group(backend: str, device: str, **kwargs: Any) -> None:
    """init_process_group; by default from torchrun's environment variables (env://)."""
    device_id = torch.device(device) if device.startswith("cuda") else None
    torch.distributed.init_process_group(backend=backend, device_id=device_id, **kwargs)


def teardown(rt: Runtime) -> None:
    """Leave the process group setup_runtime joined; one the caller made is left to the caller."""
    if rt.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peak_flops(rt: Runtime, configured: float = 0.0) -> float:
    """The device's peak FLOP/s in rt.dtype: configured, else a known GPU's datasheet, else
    measured with a large matmul (CPUs and unknown GPUs)."""
    if configured > 0:
        return configured
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, half, fp32 in GPU_PEAK_FLOPS:
            if key in name:
                return half if rt.dtype != "float32" else fp32
    return measure_matmul_flops(rt.device, rt.ptdtype)


def measure_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n matmul over a short burst: the attainable peak for MFU on
    devices without a datasheet entry."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    for _ in range(1000):
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for asynchronous devices
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > seconds:
            break
    return 2 * n**3 / best
