"""What a run reports: metrics.jsonl and wandb, the startup banner, log-line speed, the final
summary, and loss curves drawn from metrics.jsonl (python plot.py).

    python plot.py out-shakespeare-char                        # -> out-shakespeare-char/loss.png
    python plot.py out-a out-b --out=compare.png               # several runs on one chart

Three panels: train and val loss against the step, val loss against tokens seen, and the
learning rate. Each run has its own colour; val is solid, train dashed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from gptsmith.config import PlotConfig
from gptsmith.configurator import UserError, cli_errors, load_config
from gptsmith.generated import GeneratedSplit
from gptsmith.runtime import Runtime

# --- while training ------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, wandb; rank 0 only (enabled)."""

    def __init__(self, out_dir: Path, enabled: bool, cfg: Any) -> None:
        self.path, self.enabled, self.wandb = out_dir / "metrics.jsonl", enabled, None
        if enabled and cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True but wandb is not installed: pip install wandb") from None
            try:
                self.wandb = wandb.init(
                    project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg)
                )
            except Exception as e:  # not logged in, no network: wandb raises its own types
                raise UserError(f"wandb could not start ({e}); run `wandb login` or set WANDB_MODE=offline") from None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def write_text(self, iter_num: int, text: str) -> None:
        """A generated sample: printed by the caller, logged to wandb here."""
        if self.wandb is not None:
            import html

            import wandb

            self.wandb.log({"sample": wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=iter_num)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Speedometer:
    """Training time per step for the log lines: the time since the last mark over the steps since
    then. An evaluation marks the clock again (its time is not training time), so a line after one,
    or after a resume at a step that is not a multiple of log_interval, covers fewer steps. The time
    left is estimated from a moving average, without the first lap (compilation, warm-up), so it
    does not swing with each line."""

    def __init__(self, iter_num: int) -> None:
        self.laps, self.average = 0, 0.0
        self.mark(iter_num)

    def mark(self, iter_num: int) -> None:
        self.t, self.iter_num = time.perf_counter(), iter_num

    def lap(self, iter_num: int) -> float:
        """Seconds per step since the last mark; marks again."""
        now = time.perf_counter()
        dt = (now - self.t) / max(1, iter_num - self.iter_num)
        self.t, self.iter_num = now, iter_num
        self.laps += 1
        if self.laps <= 2:  # the first lap stands in only until the second replaces it
            self.average = dt
        else:
            self.average += 0.1 * (dt - self.average)
        return dt

    def eta(self, steps_left: int) -> float:
        return steps_left * self.average


class Profiler:
    """torch.profiler over a span of steps (the profile=N key of train.py and bench.py): prints the
    operators and kernels that took the most time and, on a GPU, the kernels' time per step. Well
    under the time of a step run without the profiler (whose own cost slows the host), it says the
    host (Python, kernel launches) is what a faster step must cut, not the kernels. Writes the trace
    (chrome://tracing, ui.perfetto.dev) to trace, when given."""

    def __init__(self, rt: Runtime, trace: Path | None = None) -> None:
        self.rt, self.cuda, self.trace = rt, rt.device_type == "cuda", trace
        self._prof: Any = None
        self._t0 = 0.0

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        self.rt.synchronize()  # the span holds the steps' own device work, none queued before it
        self._prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])])
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self, count: int, unit: str) -> dict[str, float]:
        """End the span of count steps (or tokens, its unit), report it; return its figures."""
        self.rt.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        table = prof.key_averages()
        if self.cuda:
            print(table.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
        print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        each = wall / max(1, count) * 1000
        figures = {"profiled_ms_each": each}
        line = f"profile: {count} {unit}, {each:.3f} ms each under the profiler"
        if self.cuda:  # the device's events are kernels on one stream: their times add up without overlap
            busy = sum(e.device_time_total for e in prof.events() if e.device_type != DeviceType.CPU) / 1e6
            figures["device_busy_ms_each"] = busy / max(1, count) * 1000
            line += f", the GPU busy {figures['device_busy_ms_each']:.3f} ms of them ({busy / wall:.0%})"
        if self.trace is not None:
            prof.export_chrome_trace(str(self.trace))
            line += f"; trace: {self.trace}"
        print(line)
        return figures


def refresh_plot(out_dir: Path) -> None:
    """Redraw out_dir/loss.png; a plotting problem never stops training."""
    try:
        plot_runs([out_dir], out_dir / "loss.png")
    except Exception as e:  # matplotlib missing or broken, odd fonts, a full disk: keep training
        print(f"warning: could not draw {out_dir / 'loss.png'}: {e}")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_banner(cfg: Any, run: Any) -> None:
    """What a run is about to do: the keys that differ from the defaults, the model, device, data."""
    changed = [
        f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default
    ]
    print("config:", ", ".join(changed) or "defaults")
    model, rt = run.raw_model, run.rt
    n_all, n_body = model.get_num_params(non_embedding=False), model.get_num_params()
    print(f"model: {n_all / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without position embeddings)")
    mode = f" ({cfg.parallel})" if rt.distributed else ""
    print(
        f"device: {rt.device}, dtype: {rt.dtype}, world size: {rt.world_size}{mode}, "
        f"tokens per step: {run.tokens_per_step:,} ({run.micro_per_rank} micro-steps per rank)"
    )
    if rt.dtype_reason:
        print(f"dtype=auto chose {rt.dtype}: {rt.dtype_reason}")
    train = run.data.splits["train"]
    if isinstance(train, GeneratedSplit):  # made on the fly: no size to tell
        print(f"data: generated by {train.path}, {run.tokens_per_step:,} tokens per step")
    else:
        print("data: " + ", ".join(f"{s} {len(d):,} tokens" for s, d in run.data.splits.items()))
    shown = f"{run.peak.flops / 1e12:.3g} TFLOP/s" if run.peak.flops else "unknown, so no MFU"
    print(f"peak: {shown} ({run.peak.source}); {model.flops_per_token() / 1e6:.3g} MFLOP per token")


def print_summary(s: dict[str, Any], steps: int, out_dir: str) -> None:
    """The end of a run: losses, time, speed, the checkpoints and the command to run next."""
    best = f"{s['best_val_loss']:.4f} at step {s['best_iter']}" if s["best_iter"] is not None else "none"
    mfu = f", MFU {s['mfu'] * 100:.1f}%" if s["mfu"] is not None else ""
    if s["mfu"] is None and steps:
        mfu = ", MFU unknown (see 'peak:' above)"
    print(f"done: {steps} steps in {duration(s['elapsed_s'])} ({duration(s['eval_s'])} of it evaluating)")
    last = [f"{split} {s[split + '_loss']:.4f}" for split in ("train", "val") if s[split + "_loss"] is not None]
    print(f"  best val loss {best}" + (f"; last: {', '.join(last)}" if last else ""))
    print(f"  tokens seen {s['tokens_seen']:,}; {s['tokens_per_sec']:,.0f} tokens/s while training{mfu}")
    saved = Path(s["checkpoint"])
    best = saved.with_name("best" + saved.suffix)
    print(
        f"  checkpoints: {saved if saved.exists() else 'none written'}" + (f", best: {best}" if best.exists() else "")
    )
    if saved.suffix == ".dcp":
        print(f"  next: python consolidate.py --out_dir={out_dir}, then python sample.py --out_dir={out_dir}")
    else:
        print(f"  next: python sample.py --out_dir={out_dir}")


# --- loss curves ---------------------------------------------------------------------------------


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
                ax_step.plot(
                    [r["iter"] for r in with_train],
                    [r["train_loss"] for r in with_train],
                    color=color,
                    ls="--",
                    marker=".",
                    label=f"{name} train",
                )
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
