"""Tests for gptsmith/data.py and the shakespeare_char prepare script: sampler order, eval batches, batches, prepare errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptsmith.configurator import UserError
from gptsmith.data import BatchSampler, eval_offsets, get_batch, get_tokenizer
from helpers import ROOT, load_script


def test_random_sampler_is_a_function_of_seed_and_step():
    a = BatchSampler(10_000, 32, 4, micro_steps=2, seed=1)
    b = BatchSampler(10_000, 32, 4, micro_steps=2, seed=1)
    later = [b.offsets(s, m) for s in (5, 3) for m in (1, 0)]  # asked in another order
    assert np.array_equal(a.offsets(5, 1), later[0]) and np.array_equal(a.offsets(3, 0), later[3])
    assert not np.array_equal(a.offsets(5, 0), a.offsets(5, 1))
    assert not np.array_equal(a.offsets(5, 0), BatchSampler(10_000, 32, 4, 2, seed=2).offsets(5, 0))
    starts = np.concatenate([a.offsets(s, m) for s in range(50) for m in range(2)])
    assert starts.min() >= 0 and starts.max() <= 10_000 - 32 - 1


def test_ranks_split_the_global_micro_steps_without_overlap():
    """With 8 global micro-steps, 2 ranks x 4 or 4 ranks x 2 read the same set of windows."""
    sampler = BatchSampler(100_000, 16, 4, micro_steps=8, seed=0)
    single = [sampler.offsets(7, m) for m in range(8)]
    for world in (2, 4):
        per_rank = 8 // world
        seen = [sampler.offsets(7, rank * per_rank + m) for rank in range(world) for m in range(per_rank)]
        assert all(np.array_equal(x, y) for x, y in zip(seen, single))


def test_epoch_sampler_visits_every_window_once_per_epoch():
    n_tokens, block, batch = 1601, 16, 4  # 100 windows
    sampler = BatchSampler(n_tokens, block, batch, micro_steps=1, seed=3, mode="epoch")
    first = np.concatenate([sampler.offsets(s, 0) for s in range(25)])
    assert sorted(first) == list(range(0, 1600, 16))
    second = np.concatenate([sampler.offsets(s, 0) for s in range(25, 50)])
    assert sorted(second) == list(range(0, 1600, 16))
    assert not np.array_equal(first, second)  # reshuffled every epoch
    fresh = BatchSampler(n_tokens, block, batch, micro_steps=1, seed=3, mode="epoch")
    assert np.array_equal(fresh.offsets(30, 0), sampler.offsets(30, 0))  # resumable mid-epoch


def test_epoch_boundary_inside_a_batch():
    sampler = BatchSampler(16 * 10 + 1, 16, 3, micro_steps=1, seed=0, mode="epoch")  # 10 windows, batch 3
    starts = np.concatenate([sampler.offsets(s, 0) for s in range(10)])  # 30 windows = 3 epochs
    for epoch in range(3):
        assert sorted(starts[epoch * 10 : (epoch + 1) * 10]) == list(range(0, 160, 16))


def test_eval_offsets_are_fixed_and_whole_split_covers_everything():
    a = eval_offsets(5000, 32, 4, eval_iters=3)
    assert a.shape == (3, 4) and np.array_equal(a, eval_offsets(5000, 32, 4, eval_iters=3))
    whole = eval_offsets(1000, 32, 4, eval_iters=0)
    starts = whole[whole >= 0]
    assert list(starts) == list(range(0, 1000 - 32, 32))
    assert whole.shape[1] == 4 and (whole < 0).sum() < 4


def test_get_batch_targets_are_shifted_and_padding_is_ignored():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, np.array([0, 10, -1]), 5, "cpu")
    assert x.dtype == torch.int64 and x.shape == (3, 5)
    assert x[1].tolist() == [10, 11, 12, 13, 14] and y[1].tolist() == [11, 12, 13, 14, 15]
    assert (y[2] == -1).all()


def test_char_tokenizer_round_trip_and_unknown_characters():
    meta = {"vocab_size": 3, "stoi": {"a": 0, "b": 1, "\n": 2}, "itos": {0: "a", 1: "b", 2: "\n"}}
    encode, decode = get_tokenizer(meta)
    assert decode(encode("ab\nba")) == "ab\nba"
    with pytest.raises(UserError, match=r"outside the model's vocabulary: 'xz'"):
        encode("azbx")


def test_gpt2_tokenizer_round_trip(gpt2_bpe):
    encode, decode = get_tokenizer(None)
    ids = encode("Hello world<|endoftext|>")
    assert ids[-1] == 50256 and decode(ids) == "Hello world<|endoftext|>"


# --- data/shakespeare_char/prepare.py --------------------------------------------------------


def test_prepare_writes_splits_and_meta(char_data, play_path):
    text = play_path.read_text()
    meta = pickle.loads((char_data / "meta.pkl").read_bytes())
    train = np.fromfile(char_data / "train.bin", dtype=np.uint16)
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert meta["vocab_size"] == len(set(text)) == 65
    assert "".join(meta["itos"][i] for i in val[:200]) == text[len(train) : len(train) + 200]
    assert not list(char_data.glob(".*tmp"))


def test_prepare_real_shakespeare_as_the_readme_says(shakespeare_path, tmp_path, capsys):
    load_script("data/shakespeare_char/prepare.py").main([f"--input={shakespeare_path}", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "1,115,394 characters, vocabulary of 65" in out
    assert (tmp_path / "train.bin").stat().st_size == 2 * 1_003_854
    assert (tmp_path / "val.bin").stat().st_size == 2 * 111_540


@pytest.mark.parametrize(
    "content,message",
    [(b"", "is empty"), (b"\xff\xfe\x00bad", "not valid UTF-8"), (None, "not found")],
    ids=["empty", "binary", "missing"],
)
def test_prepare_refuses_bad_input_and_leaves_existing_files(tmp_path, char_data, content, message):
    out = tmp_path / "data"
    out.mkdir()
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (out / name).write_bytes((char_data / name).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "input.txt"
    if content is not None:
        bad.write_bytes(content)
    prepare = load_script("data/shakespeare_char/prepare.py")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([f"--input={bad}", f"--out_dir={out}"])
    assert exit_info.value.code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_prepare_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "data/shakespeare_char/prepare.py",
            f"--input={tmp_path / 'nope.txt'}",
            f"--out_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "not found" in result.stderr and list(Path(tmp_path).iterdir()) == []


def test_prepare_offline_without_a_copy_says_to_pass_input(tmp_path, monkeypatch, capsys):
    prepare = load_script("data/shakespeare_char/prepare.py")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setattr(prepare, "__file__", str(tmp_path / "prepare.py"))  # no input.txt beside it
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([f"--out_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    assert "pass --input=PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tests_needing_shared_files_skip_without_them_except_under_ci(tmp_path):
    """A fresh clone without ../shared: the real-Shakespeare tests skip and say why; under .ci/run
    (GPTSMITH_REQUIRE_SHARED=1) the same skip is a failure, so CI runs every test."""
    target = "tests/test_data.py::test_prepare_real_shakespeare_as_the_readme_says"
    env = {k: v for k, v in os.environ.items() if k != "GPTSMITH_REQUIRE_SHARED"}
    env["GPTSMITH_SHAKESPEARE"] = str(tmp_path / "nowhere.txt")

    def run(**extra) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", target],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
        )

    skipped = run()
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout and "tiny Shakespeare not found" in skipped.stdout
    required = run(GPTSMITH_REQUIRE_SHARED="1")
    assert required.returncode == 1 and "1 error" in required.stdout and "GPTSMITH_REQUIRE_SHARED" in required.stdout
