"""What a person watching training sees: summary, eval samples, loss.png, wandb, progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptsmith import configurator
from gptsmith.configurator import UserError
from gptsmith.trainer import train
from helpers import ROOT


def test_run_summary_names_everything_needed_next(tiny_cfg, capsys):
    cfg = tiny_cfg(max_iters=10, eval_interval=5, peak_flops=1e11)  # a known peak, so MFU is shown
    summary = train(cfg)
    out = capsys.readouterr().out
    summary_lines = out[out.index("done: 10 steps") :]
    assert f"best val loss {summary['best_val_loss']:.4f} at step {summary['best_iter']}" in summary_lines
    assert "tokens seen 2,560" in summary_lines and "tokens/s while training, MFU" in summary_lines
    assert f"checkpoints: {Path(cfg.out_dir) / 'ckpt.pt'}" in summary_lines
    assert f"next: python sample.py --out_dir={cfg.out_dir}" in summary_lines
    assert summary["tokens_per_sec"] > 0 and 0 < summary["mfu"] < 1 and summary["eval_s"] > 0


def test_loss_png_is_refreshed_at_each_eval(tiny_cfg):
    cfg = tiny_cfg(max_iters=4, eval_interval=2, plot=True)
    train(cfg)
    png = Path(cfg.out_dir) / "loss.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_eval_sample_is_printed(tiny_cfg, capsys):
    train(tiny_cfg(max_iters=2, eval_interval=2, eval_sample_tokens=30))
    out = capsys.readouterr().out
    assert out.count("sample at step") == 2  # steps 0 and 2
    text = out.split("sample at step 2:\n")[1].split("\n---------------")[0]
    assert len(text) == 30


def test_offline_wandb_run_holds_the_logged_metrics(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_cfg(max_iters=4, eval_interval=2, wandb_log=True, wandb_run_name="tiny", eval_sample_tokens=10))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    keys = (b"train_loss", b"val_loss", b"tokens_per_sec", b"mfu", b"tokens_seen", b"sample", b"tiny")
    deadline = time.time() + 60  # wandb's service process may still be flushing on a loaded machine
    while True:
        data = runs[0].read_bytes()  # protobuf records: keys and config values are stored as plain strings
        if all(key in data for key in keys) or time.time() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key


def test_wandb_not_installed_is_one_clear_error(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = tiny_cfg(wandb_log=True)
    with pytest.raises(UserError, match="wandb is not installed: pip install wandb"):
        train(cfg)


def test_progress_bars_only_at_a_terminal_outside_ci(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert configurator.show_progress()
    monkeypatch.setenv("CI", "true")
    assert not configurator.show_progress()
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not configurator.show_progress()


def test_no_progress_bar_output_under_ci(tiny_cfg):
    cfg = tiny_cfg(max_iters=2, eval_interval=2)
    train(cfg)
    env = {**os.environ, "CI": "true"}
    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--out_dir={cfg.out_dir}",
            "--device=cpu",
            "--num_samples=1",
            "--max_new_tokens=20",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "tok/s" not in result.stderr and "it/s" not in result.stderr
