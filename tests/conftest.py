"""Shared fixtures: the tiny Shakespeare text from ../shared, prepared once per session."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# tiktoken finds GPT-2's BPE files here when offline (CI sets it too).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("CI", "true")  # no progress bars in test output


def load_script(relpath: str) -> ModuleType:
    """Import a script that lives outside a package, e.g. data/<name>/prepare.py."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = Path(os.environ.get("GPTSMITH_SHAKESPEARE", SHARED / "data" / "tinyshakespeare" / "input.txt"))
    if not path.is_file():
        pytest.fail(f"tiny Shakespeare not found at {path}; put ../shared beside the repo or set GPTSMITH_SHAKESPEARE")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Path:
    """data/shakespeare_char prepared into a temporary folder."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    load_script("data/shakespeare_char/prepare.py").main([f"--input={shakespeare_path}", f"--out_dir={out}"])
    return out


@pytest.fixture
def tiny_cfg(char_data: Path, tmp_path: Path):
    """A factory for a TrainConfig of a tiny model that trains in a second or two on CPU."""
    from train import TrainConfig

    base = TrainConfig(
        dataset=str(char_data),
        out_dir=str(tmp_path / "out"),
        device="cpu",
        compile=False,
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=8,
        dropout=0.0,
        bias=False,
        learning_rate=3e-3,
        min_lr=3e-4,
        max_iters=20,
        lr_decay_iters=20,
        warmup_iters=4,
        eval_interval=10,
        eval_iters=4,
        log_interval=1,
        peak_flops=1e11,  # skip measuring the CPU's matmul peak in every test
        plot=False,  # matplotlib costs a second per eval; tests/test_plot.py covers plotting
    )

    def make(**overrides):
        return dataclasses.replace(base, **overrides)

    return make
