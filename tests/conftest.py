"""Fixtures. Most tests run on data they make themselves; the few that need the real tiny
Shakespeare or tiktoken's GPT-2 files (../shared) skip without them, except under .ci/run,
which sets GPTSMITH_REQUIRE_SHARED=1 and so turns such a skip into a failure."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from helpers import SHARED, TINY, load_script, make_play, missing_shared

# tiktoken finds GPT-2's BPE files here when offline (CI sets it too).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("CI", "true")  # no progress bars in test output


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda skip on machines without a CUDA GPU (CI's); .ci/gpu-bench runs them on one."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session", autouse=True)
def peak_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Measured matmul peaks go to a folder of the test session, not the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["GPTSMITH_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real tiny Shakespeare, for the tests about it."""
    path = Path(os.environ.get("GPTSMITH_SHAKESPEARE", SHARED / "data" / "tinyshakespeare" / "input.txt"))
    if not path.is_file():
        missing_shared(
            f"tiny Shakespeare not found at {path}; put ../shared beside the repo or set GPTSMITH_SHAKESPEARE"
        )
    return path


@pytest.fixture(scope="session")
def gpt2_bpe() -> None:
    """tiktoken's GPT-2 files must load (offline they come from TIKTOKEN_CACHE_DIR)."""
    import tiktoken

    try:
        tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors of many kinds when the files are not cached
        missing_shared(f"tiktoken's GPT-2 files are not available ({type(e).__name__}); set TIKTOKEN_CACHE_DIR")


@pytest.fixture(scope="session")
def play_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A made-up play in tiny Shakespeare's 65 characters (helpers.make_play)."""
    path = tmp_path_factory.mktemp("play") / "input.txt"
    path.write_text(make_play(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, play_path: Path) -> Path:
    """The made-up play, prepared by data/shakespeare_char/prepare.py into a temporary folder."""
    out = tmp_path_factory.mktemp("play_char")
    load_script("data/shakespeare_char/prepare.py").main([f"--input={play_path}", f"--out_dir={out}"])
    return out


@pytest.fixture
def tiny_cfg(char_data: Path, tmp_path: Path):
    """A factory for a TrainConfig of a tiny model that trains in a second or two on CPU.

    Everything not pinned here is the default. The pins: a tiny model and short run (the suite
    must take minutes), one micro-step per step (nanoGPT's default 40 is for GPT-2 on 8 GPUs;
    config/shakespeare_char.py sets 1 too), 4 eval batches instead of 200, no compile (tens of
    seconds per test) and no loss.png (a second per eval). test_defaults.py runs the defaults.
    """
    from gptsmith.config import TrainConfig

    base = TrainConfig(dataset=str(char_data), out_dir=str(tmp_path / "out"), **TINY)

    def make(**overrides):
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline wandb writing into its own folder, returned. wandb keeps one settings object per
    process from its first run on (the folder among them), so it is reset before and after: a test
    run after another that used wandb then still finds its run where it looks."""
    import wandb

    folder = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield folder
    wandb.teardown()
