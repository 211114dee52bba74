"""gptsmith/metrics.py and what a person watching training sees: summary, eval samples, loss.png,
wandb, progress bars, and plot.py's PNGs from metrics.jsonl, for one run and for several."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptsmith import configurator
from gptsmith.configurator import UserError
from gptsmith.metrics import main, read_metrics
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


def test_profile_runs_its_steps_under_the_profiler_and_writes_the_trace(tiny_cfg, capsys, monkeypatch):
    import torch

    from gptsmith import trainer

    profiled = {}  # each step's number -> whether the profiler was on while it ran
    real_step = trainer.train_step

    def spy(run, state):
        profiled[state.iter_num] = torch._C._autograd._profiler_enabled()
        return real_step(run, state)

    monkeypatch.setattr(trainer, "train_step", spy)
    cfg = tiny_cfg(max_iters=16, profile=3)
    train(cfg)
    out = capsys.readouterr().out
    assert [i for i, on in profiled.items() if on] == [10, 11, 12]  # 10 steps in (compiling), then 3
    assert "profile: 3 steps, " in out and "Self CPU" in out and "aten::mm" in out
    trace = Path(cfg.out_dir) / "profile_trace.json"
    assert f"trace: {trace}" in out and json.loads(trace.read_text())["traceEvents"]
    speeds = [r["tokens_per_sec"] for r in read_metrics(Path(cfg.out_dir))[1]]  # a log line per step
    assert len(speeds) == 16 and max(speeds) < 5 * sorted(speeds)[8]  # none timed over no steps

    profiled.clear()
    train(tiny_cfg(max_iters=11, profile=5, out_dir=cfg.out_dir + "-short"))  # the run ends inside the span
    assert [i for i, on in profiled.items() if on] == [10]
    assert "profile: 1 steps, " in capsys.readouterr().out
    train(tiny_cfg(max_iters=8, profile=5, out_dir=cfg.out_dir + "-shorter"))
    assert "profile: nothing profiled, the run ended before step 10" in capsys.readouterr().out

    profiled.clear()
    train(tiny_cfg(out_dir=cfg.out_dir + "-default"))  # off by default
    assert len(profiled) == 20 and not any(profiled.values())
    assert not (Path(cfg.out_dir + "-default") / "profile_trace.json").exists()
    with pytest.raises(UserError, match="profile must not be negative"):
        tiny_cfg(profile=-1)


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


def test_offline_wandb_run_holds_the_logged_metrics(tiny_cfg, wandb_dir):
    train(tiny_cfg(max_iters=4, eval_interval=2, wandb_log=True, wandb_run_name="tiny", eval_sample_tokens=10))
    runs = list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
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
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "tok/s" not in result.stderr and "it/s" not in result.stderr


# --- plot.py ---------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(folder: Path, steps: int = 100, scale: float = 1.0, extra: list[dict] | None = None) -> Path:
    """A metrics.jsonl shaped like train.py's: a log record per step, an eval record every 20."""
    folder.mkdir(parents=True)
    lines = []
    for it in range(0, steps + 1):
        lr = 1e-3 * min(1.0, (it + 1) / 10)
        if it:
            lines.append({"iter": it, "loss": scale * 4 / math.sqrt(it), "lr": lr, "tokens_per_sec": 1e4, "mfu": 0.5})
        if it % 20 == 0:
            val = scale * 4 / math.sqrt(it + 1)
            lines.append(
                {
                    "iter": it,
                    "train_loss": val * 0.9,
                    "val_loss": val,
                    "lr": lr,
                    "tokens_seen": it * 768,
                    "elapsed_s": it / 10,
                }
            )
    lines += extra or []
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iter": 10')  # torn tail
    return folder


def image_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_one_run_defaults_to_loss_png_in_its_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "run-a")
    main([str(run)])
    width, height = image_size(run / "loss.png")
    assert width > 800 and height > 300
    assert "wrote" in capsys.readouterr().out
    assert not list(run.glob(".*.tmp"))


def test_two_runs_on_one_chart(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", scale=1.2)
    out = tmp_path / "charts" / "compare.png"
    main([str(a), str(b), f"--out={out}", "--title=a against b"])
    single = tmp_path / "single.png"
    main([str(a), f"--out={single}"])
    assert image_size(out) == image_size(single)
    assert out.read_bytes() != single.read_bytes()  # the second run's curves are drawn


def test_resumed_history_replaces_records_from_the_resume_step_on(tmp_path):
    resumed = [
        {"iter": 41, "loss": 9.0, "lr": 1e-3, "tokens_per_sec": 1.0, "mfu": 0.1},
        {"iter": 60, "train_loss": 8.0, "val_loss": 8.5, "lr": 1e-3, "tokens_seen": 1, "elapsed_s": 1.0},
    ]
    evals, logs = read_metrics(fake_run(tmp_path / "r", extra=resumed))
    assert [r["iter"] for r in evals] == [0, 20, 40, 60] and evals[-1]["val_loss"] == 8.5
    assert [r["iter"] for r in logs] == list(range(1, 41)) + [41]
    assert logs[-1]["loss"] == 9.0


def test_training_run_metrics_plot(tiny_cfg):
    from gptsmith.trainer import train

    cfg = tiny_cfg(max_iters=10, eval_interval=5)
    train(cfg)
    evals, logs = read_metrics(Path(cfg.out_dir))
    assert [r["iter"] for r in evals] == [0, 5, 10] and len(logs) == 10
    main([cfg.out_dir, f"--out={cfg.out_dir}/curves.png"])
    assert image_size(Path(cfg.out_dir) / "curves.png")[0] > 800


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda p: None, [], "give at least one run folder"),
        (lambda p: None, ["{p}/missing"], "not found"),
        (lambda p: (p / "empty").mkdir(), ["{p}/empty"], "metrics.jsonl not found"),
        (lambda p: fake_run(p / "r"), ["{p}/r", "--out={p}/x.jpg"], "must end in .png"),
        (lambda p: fake_run(p / "r"), ["{p}/r", "--colour=red"], "unknown config key"),
    ],
    ids=["no-folder", "missing-folder", "not-a-run", "not-png", "unknown-option"],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([a.format(p=tmp_path) for a in args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_time_left_is_smoothed_and_leaves_out_the_first_interval(monkeypatch):
    from gptsmith import metrics

    now = {"t": 0.0}
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now["t"])
    clock = metrics.Speedometer(0)
    laps = []
    for it, seconds in enumerate([30.0, 1.0, 1.0, 3.0, 1.0], start=1):  # a slow first step (compilation), a hiccup
        now["t"] += seconds
        laps.append(clock.lap(it))
        if it == 1:
            assert clock.eta(100) == 3000.0  # only the first interval is known yet
    assert laps == [30.0, 1.0, 1.0, 3.0, 1.0]
    assert clock.eta(100) == pytest.approx(100 * 1.18)  # 1, then 1 + 0.1 * (3 - 1) = 1.2, then 1.2 - 0.02
