"""Plot training curves from one or more runs' metrics.jsonl.

    python plot.py out-shakespeare-char                        # -> out-shakespeare-char/loss.png
    python plot.py out-a out-b --out=compare.png               # several runs on one chart

Three panels: train and val loss against the step, val loss against tokens seen, and the
learning rate. Each run has its own colour; val is solid, train dashed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configurator import UserError, cli_errors, load_config, opt


@dataclass
class PlotConfig:
    """Plot options (the run folders are given as positional arguments)."""

    out: str = opt("", "PNG file to write (default: loss.png in the first run's folder)")
    title: str = opt("", "chart title (default: the run folders' names)")


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(eval records, log records) of a run's metrics.jsonl, as the run's history now stands.

    A resumed or restarted run appends records whose step goes back; they replace every
    earlier record from that step on. Unreadable lines (a run still writing) are skipped.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; is {run_dir} a training out_dir?")
    kept: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            continue
        if kept and record["iter"] < kept[-1]["iter"]:
            kept = [r for r in kept if r["iter"] < record["iter"]]
        kept.append(record)
    evals = list({r["iter"]: r for r in kept if "val_loss" in r}.values())  # a re-evaluation replaces
    logs = [r for r in kept if "loss" in r and "val_loss" not in r]
    if not evals and not logs:
        raise UserError(f"{path} holds no metrics yet")
    return evals, logs


def plot_runs(run_dirs: list[Path], out: Path, title: str = "") -> Path:
    """Draw the runs' curves into out (PNG), written atomically; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [(d, *read_metrics(d)) for d in run_dirs]
    fig, (ax_step, ax_tokens, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (run_dir, evals, logs) in enumerate(runs):
        color = f"C{i}"
        name = run_dir.name or str(run_dir)
        if logs:
            ax_step.plot([r["iter"] for r in logs], [r["loss"] for r in logs], color=color, alpha=0.2, lw=0.8)
        if evals:
            steps = [r["iter"] for r in evals]
            with_train = [r for r in evals if r.get("train_loss") is not None]  # absent with eval_train=False
            if with_train:
                ax_step.plot([r["iter"] for r in with_train], [r["train_loss"] for r in with_train], color=color,
                             ls="--", marker=".", label=f"{name} train")  # fmt: skip
            ax_step.plot(steps, [r["val_loss"] for r in evals], color=color, marker="o", ms=3, label=f"{name} val")
            tokens = [r["tokens_seen"] for r in evals]
            ax_tokens.plot(tokens, [r["val_loss"] for r in evals], color=color, marker="o", ms=3, label=name)
        lr_records = logs or evals
        ax_lr.plot([r["iter"] for r in lr_records], [r["lr"] for r in lr_records], color=color, label=name)
    ax_step.set(xlabel="step", ylabel="loss", title="loss (faint: per-step training loss)")
    ax_tokens.set(xlabel="tokens seen", ylabel="val loss", title="val loss against tokens")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_step, ax_tokens, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or ", ".join(d.name or str(d) for d in run_dirs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)  # a viewer never sees a half-written image
    return out


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        argv = sys.argv[1:] if argv is None else argv
        if "-h" in argv or "--help" in argv:
            print("usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png] [--title=TEXT]\n")
        dirs = [Path(a) for a in argv if not a.startswith("-")]
        cfg = load_config(PlotConfig, [a for a in argv if a.startswith("-")])
        if not dirs:
            raise UserError("give at least one run folder: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]")
        for d in dirs:
            if not d.is_dir():
                raise UserError(f"run folder {d} not found")
        out = Path(cfg.out) if cfg.out else dirs[0] / "loss.png"
        if out.suffix.lower() != ".png":
            raise UserError(f"--out={out} must end in .png")
        print(f"wrote {plot_runs(dirs, out, cfg.title)}")


if __name__ == "__main__":
    main()
