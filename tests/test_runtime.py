"""runtime.py: the torch floor, and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gptsmith import runtime
from gptsmith.configurator import UserError
from gptsmith.runtime import Runtime, check_torch_version, measure_matmul_flops, peak_flops


def test_torch_floor_is_checked_with_one_line():
    check_torch_version()  # the torch running these tests is new enough
    check_torch_version("2.6.0+cpu")
    with pytest.raises(UserError, match=r"needs torch >= 2\.6, this is torch 2\.5\.1"):
        check_torch_version("2.5.1+cu121")
    with pytest.raises(UserError, match=r"needs torch >= 2\.6"):
        check_torch_version("1.13.1")


def test_pyproject_states_the_same_floor():
    import tomllib

    from helpers import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = ".".join(map(str, runtime.TORCH_FLOOR))
    assert f"torch>={floor}" in deps


def test_measuring_the_peak_leaves_the_random_streams_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    flops, others = measure_matmul_flops("cpu", torch.float32, n=256, seconds=0.05)
    assert flops > 0 and others >= 0
    assert torch.equal(torch.get_rng_state(), before)


def test_peak_is_measured_once_per_machine_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTSMITH_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(device, dtype):
        calls.append(dtype)
        return 1.5e11, 0.0  # an idle machine

    monkeypatch.setattr(runtime, "measure_matmul_flops", measure)
    rt = Runtime(device="cpu", dtype="float32")
    first, second = peak_flops(rt), peak_flops(rt)
    assert first.flops == second.flops == 1.5e11 and len(calls) == 1
    assert "measured now" in first.source and "measured earlier" in second.source
    assert list(json.loads((tmp_path / "peak_flops.json").read_text()).values()) == [1.5e11]
    assert peak_flops(Runtime(device="cpu", dtype="bfloat16")).flops == 1.5e11 and len(calls) == 2  # per dtype
    assert peak_flops(rt, configured=2e12).flops == 2e12 and len(calls) == 2
    assert peak_flops(rt, remeasure=True).flops == 1.5e11 and len(calls) == 3  # bench.py --what=peak


def test_a_peak_measured_under_load_is_not_used(tmp_path, monkeypatch):
    """Another process sharing the cores would halve the measured peak and double the MFU: no MFU instead."""
    monkeypatch.setenv("GPTSMITH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "measure_matmul_flops", lambda device, dtype: (0.7e11, 0.45))
    peak = peak_flops(Runtime(device="cpu", dtype="float32"))
    assert peak.flops is None and "45%" in peak.source and peak.mfu(1e10) is None
    assert not (tmp_path / "peak_flops.json").exists()


def test_busy_cpus_are_noticed():
    """A second process spinning on a core shows up in the measurement's share of others' CPU time."""
    import subprocess
    import sys

    if runtime._cpu_ticks() is None:
        pytest.skip("no /proc to read CPU time from")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _, others = measure_matmul_flops("cpu", torch.float32, n=128, seconds=1.0)
    finally:
        spinner.kill()
    assert others > 0.5 / os.cpu_count()  # about one core's worth of this machine


def test_each_torchrun_restart_round_rendezvouses_apart(monkeypatch):
    """Restarted workers share torchrun's store with the dead ones: keys written in round 0 (their
    addresses) must not be seen in round 1, or the new workers try to connect to dead ones."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = runtime._restart_safe_rendezvous(rank=0, world_size=2)
    first["store"].set("rank_0_address", "a worker that will die")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = runtime._restart_safe_rendezvous(rank=0, world_size=2)
    assert (second["rank"], second["world_size"]) == (0, 2)
    assert not second["store"].check(["rank_0_address"]) and first["store"].check(["rank_0_address"])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert runtime._restart_safe_rendezvous(rank=0, world_size=2) == {}  # plain env:// otherwise
