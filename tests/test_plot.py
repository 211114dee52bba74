"""plot.py draws valid PNGs from metrics.jsonl, for one run and for several."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gptsmith.metrics import main, read_metrics

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
            lines.append({"iter": it, "train_loss": val * 0.9, "val_loss": val, "lr": lr, "tokens_seen": it * 768,
                          "elapsed_s": it / 10})  # fmt: skip
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
