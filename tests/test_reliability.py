"""Faults and hostile input: kills, signals, NaNs, damaged data and checkpoints."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import model as model_module
from gptsmith.configurator import UserError
from gptsmith.trainer import train
from helpers import ROOT, nan_after


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def cli_args(cfg) -> list[str]:
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]


def start_training(cfg) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", *cli_args(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"training never printed {prefix!r}: {proc.stderr.read()[-2000:]}")


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_is_exact(tiny_cfg, tmp_path, signum):
    kw = dict(max_iters=400, lr_decay_iters=400, eval_interval=1000, dropout=0.1)
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)

    cfg = tiny_cfg(out_dir=str(tmp_path / "stopped"), **kw)
    proc = start_training(cfg)
    wait_for_line(proc, "iter 20:")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    stopped_at = state["iter_num"]
    assert 20 <= stopped_at < 400

    train(dataclasses.replace(cfg, init_from="resume"), explicit={"init_from"})
    a = ckpt_io.load_checkpoint(Path(straight.out_dir) / "ckpt.pt")["model"]
    b = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- SIGKILL at random moments ---------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_times_leaves_a_loadable_checkpoint(tiny_cfg, tmp_path):
    # Save at every step so kills land mid-save as often as possible.
    cfg = tiny_cfg(max_iters=100_000, lr_decay_iters=100_000, eval_interval=1, eval_iters=1, log_interval=1000)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    rng = random.Random(0)
    iters = []
    for attempt in range(6):
        run = cfg if attempt == 0 else dataclasses.replace(cfg, init_from="resume")
        proc = start_training(run)
        wait_for_line(proc, "step ")  # the first eval: setup is done
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        state = ckpt_io.load_checkpoint(ckpt)  # never torn
        iters.append(state["iter_num"])
    assert iters == sorted(iters) and iters[-1] > iters[0]  # each resume went on from the last
    # A clean finish removes the temporary files that killed saves left behind.
    train(dataclasses.replace(cfg, init_from="resume", max_iters=iters[-1] + 2), explicit={"init_from", "max_iters"})
    assert [p.name for p in Path(cfg.out_dir).iterdir() if ".tmp" in p.name] == []


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt_io.save_checkpoint({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_io.save_checkpoint({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


# --- non-finite loss -------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(max_iters=20, eval_interval=5)
    nan_after(monkeypatch, 7)  # forward calls with grad: one per step here
    with pytest.raises(UserError, match="non-finite loss or gradient at step 7"):
        train(cfg)
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert state["iter_num"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_skip_nonfinite_skips_steps(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg(max_iters=10, eval_interval=10, skip_nonfinite=True)
    nan_after(monkeypatch, 7)
    train(cfg)
    assert "step 9: skipped" in capsys.readouterr().out
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert state["iter_num"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# --- damaged datasets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "train.bin").unlink(), "has no"),
        (lambda d: (d / "val.bin").write_bytes(b""), "empty"),
        (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-1]), "odd number of bytes"),
        (lambda d: (d / "meta.pkl").write_bytes(b"\x80\x04garbage"), "meta.pkl is unreadable"),
        (lambda d: (d / "meta.pkl").write_bytes((d / "meta.pkl").read_bytes()[:40]), "meta.pkl is unreadable"),
        (lambda d: (d / "meta.pkl").write_bytes(pickle.dumps({"itos": {}})), "no valid vocab_size"),
    ],
    ids=["missing-train", "empty-val", "truncated-val", "garbage-meta", "truncated-meta", "meta-without-vocab"],
)
def test_damaged_dataset_is_refused_untouched(tiny_cfg, tmp_path, char_data, damage, message):
    data = copy_dataset(char_data, tmp_path / "data")
    damage(data)
    before = snapshot(data)
    cfg = tiny_cfg(dataset=str(data))
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert snapshot(data) == before
    assert not Path(cfg.out_dir).exists()


# --- damaged checkpoints ---------------------------------------------------------------------


@pytest.fixture
def trained(tiny_cfg):
    cfg = tiny_cfg(max_iters=2, eval_interval=2)
    train(cfg)
    return cfg


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[: len(b) // 3], "unreadable"),
        (lambda b: os.urandom(4096), "unreadable"),
        (lambda b: b"", "unreadable"),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_damaged_checkpoint_is_refused_untouched(trained, damage, message):
    path = Path(trained.out_dir) / "ckpt.pt"
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(Path(trained.out_dir))
    with pytest.raises(UserError, match=message):
        train(dataclasses.replace(trained, init_from="resume", max_iters=4))
    assert snapshot(Path(trained.out_dir)) == before


def test_checkpoint_of_another_architecture(trained):
    path = Path(trained.out_dir) / "ckpt.pt"
    state = ckpt_io.load_checkpoint(path)
    state["model_args"]["n_embd"] = 64  # its weights are 32 wide
    state["model_args"]["n_head"] = 4
    ckpt_io.save_checkpoint(state, path)
    with pytest.raises(UserError, match="does not fit this architecture"):
        train(dataclasses.replace(trained, init_from="resume", max_iters=4))
    from gptsmith.config import SampleConfig
    from gptsmith.sampler import sample

    with pytest.raises(UserError, match="does not fit this architecture"):
        sample(SampleConfig(out_dir=trained.out_dir, device="cpu"))


def test_foreign_file_as_checkpoint(trained):
    path = Path(trained.out_dir) / "ckpt.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(UserError, match="not a gptsmith checkpoint"):
        train(dataclasses.replace(trained, init_from="resume", max_iters=4))


def test_too_little_disk_space(tiny_cfg, monkeypatch):
    monkeypatch.setattr(ckpt_io.shutil, "disk_usage", lambda p: _Usage(free=1000))
    with pytest.raises(UserError, match="MiB free but checkpoints need"):
        train(tiny_cfg())


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


# --- sample.py on bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(ckpt="nope.pt"), "no checkpoint"),
        (dict(start="ROMEO: \u00e9\u4e2d"), "outside the model's vocabulary: '\u00e9\u4e2d'"),
        (dict(start="FILE:/nonexistent/prompt.txt"), "prompt file /nonexistent/prompt.txt not found"),
        (dict(start=""), "prompt is empty"),
    ],
    ids=["unknown-checkpoint", "unknown-characters", "missing-prompt-file", "empty-prompt"],
)
def test_sample_bad_input_is_refused_untouched(trained, overrides, message):
    from gptsmith.config import SampleConfig
    from gptsmith.sampler import sample

    before = snapshot(Path(trained.out_dir))
    with pytest.raises(UserError, match=message):
        sample(SampleConfig(out_dir=trained.out_dir, device="cpu", num_samples=1, max_new_tokens=5, **overrides))
    assert snapshot(Path(trained.out_dir)) == before


# --- float16: the GradScaler path ------------------------------------------------------------


class InfGradient(torch.autograd.Function):
    """Identity forward; backward turns the gradient infinite: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inf_gradient_at(monkeypatch, steps: set[int]) -> None:
    """Make the gradient (not the loss) infinite at these training forward passes (0-based)."""
    real = model_module.masked_cross_entropy
    count = {"n": -1}

    def poisoned(logits, targets):
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] in steps:
                logits = InfGradient.apply(logits)
        return real(logits, targets)

    monkeypatch.setattr(model_module, "masked_cross_entropy", poisoned)


def test_float16_skip_nonfinite_trains_on_past_nan_losses(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg(dtype="float16", skip_nonfinite=True, max_iters=10, eval_interval=10)
    nan_after(monkeypatch, 6)  # steps 6..9 have NaN losses: each is skipped, and the next step must still work
    summary = train(cfg)
    out = capsys.readouterr().out
    assert summary["iter"] == 10 and all(f"step {i}: skipped" in out for i in range(6, 10))
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["scaler"]["scale"] < 2.0**16  # each skipped step lowered the loss scale


def test_float16_nonfinite_gradient_with_finite_loss_is_the_scalers_to_skip(tiny_cfg, monkeypatch):
    """With float16 an overflowing gradient is normal: GradScaler skips the step and lowers the scale,
    with or without skip_nonfinite; in float32 the same gradient stops training (or is skipped)."""
    inf_gradient_at(monkeypatch, {3, 4})
    cfg = tiny_cfg(dtype="float16", max_iters=8, eval_interval=8)
    assert train(cfg)["iter"] == 8
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert state["scaler"]["scale"] == 2.0**14  # halved twice
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    monkeypatch.undo()
    inf_gradient_at(monkeypatch, {3})
    with pytest.raises(UserError, match="non-finite loss or gradient at step 3"):
        train(tiny_cfg(out_dir=cfg.out_dir + "-fp32", max_iters=8, eval_interval=8))
    monkeypatch.undo()
    inf_gradient_at(monkeypatch, {3})
    assert (
        train(tiny_cfg(out_dir=cfg.out_dir + "-skip", skip_nonfinite=True, max_iters=8, eval_interval=8))["iter"] == 8
    )


# --- a signal during a long evaluation -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("always_save", [True, False])
def test_signal_during_a_long_evaluation_stops_within_seconds(tiny_cfg, tmp_path, always_save):
    """An evaluation of minutes (here 100,000 batches) is abandoned at once: the state of the step
    is saved as the resume point (also with always_save_checkpoint=False) and resuming is exact."""
    kw = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, dropout=0.1, always_save_checkpoint=always_save)
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), eval_iters=2, **kw)
    train(straight)
    cfg = tiny_cfg(out_dir=str(tmp_path / "stopped"), eval_iters=100_000, eval_at_start=False, **kw)
    proc = start_training(cfg)
    wait_for_line(proc, "iter 10:")  # the evaluation at step 10 starts now
    time.sleep(1.0)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - signalled < 10
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "abandoned it" in out and "resume with --init_from=resume" in err
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert state["iter_num"] == 10 and not state["evaluated"]
    train(dataclasses.replace(cfg, init_from="resume", eval_iters=2), explicit={"init_from", "eval_iters"})
    a = ckpt_io.load_checkpoint(Path(straight.out_dir) / "ckpt.pt")["model"]
    b = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_signal_during_the_first_evaluation_saves_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg(eval_iters=100_000)
    proc = start_training(cfg)
    wait_for_line(proc, "peak:")  # the step-0 evaluation follows
    time.sleep(1.0)
    signalled = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - signalled < 10 and proc.returncode == 128 + signal.SIGINT
    assert err.strip().endswith("nothing was trained, nothing saved") and err.count("\n") == 1, err
    assert not (Path(cfg.out_dir) / "ckpt.pt").exists()
