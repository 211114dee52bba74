"""Train a GPT, nanoGPT-style.

    python train.py config/shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallel=fsdp

Every key, its default and meaning: python train.py --help
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as ckpt_io
import dataset as ds
import optim
import parallel
from configurator import UserError, cli_errors, opt, read_overrides, show_progress
from model import GPT, MODEL_OPTIONS, GPTConfig
from runtime import Peak, Runtime, peak_flops, setup_runtime, teardown

# The keys that fix the architecture a checkpoint records (a checkpoint older than MODEL_OPTIONS means their defaults).
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", *MODEL_OPTIONS, "vocab_size")


@dataclass
class TrainConfig:
    """Training configuration: nanoGPT's keys and meanings, plus a few of our own."""

    # I/O
    out_dir: str = opt("out", "folder for checkpoints (ckpt.pt, best.pt) and metrics.jsonl")
    eval_interval: int = opt(2000, "evaluate train/val loss every this many steps (and at the last)")
    log_interval: int = opt(1, "print a log line every this many steps")
    eval_iters: int = opt(200, "batches per loss estimate; 0 = the whole split")
    eval_only: bool = opt(False, "estimate the losses once and exit, without training")
    eval_train: bool = opt(
        True, "estimate the train loss too at each eval; False = val only (saves time with eval_iters=0)"
    )
    eval_at_start: bool = opt(True, "evaluate before the first step, as nanoGPT does; False saves that time")
    always_save_checkpoint: bool = opt(True, "write ckpt.pt at every eval, not only when val loss improves")
    init_from: str = opt(
        "scratch",
        "'scratch', 'resume' (from out_dir/ckpt.pt), 'auto' (resume if out_dir holds a checkpoint, else scratch: "
        "for restarts by torchrun --max-restarts or a job scheduler), or pretrained GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
        "(Hugging Face hub) or the path of a local Hugging Face model folder, or another run's checkpoint (a ckpt.pt "
        "path or its out_dir) to start a new run from its weights",
    )
    # wandb
    wandb_log: bool = opt(False, "log metrics to Weights & Biases")
    wandb_project: str = opt("owt", "wandb project")
    wandb_run_name: str = opt("gpt2", "wandb run name")
    plot: bool = opt(True, "redraw out_dir/loss.png from metrics.jsonl at every eval (python plot.py does it by hand)")
    eval_sample_tokens: int = opt(0, "at every eval, generate this many tokens, print them and log them to wandb")
    # data
    dataset: str = opt(
        "openwebtext",
        "data/<dataset>/ (under the current directory) with train.bin, val.bin (and meta.pkl), or a folder",
    )
    gradient_accumulation_steps: int = opt(5 * 8, "micro-steps per optimizer step, summed over all processes")
    total_batch_size: int = opt(
        0,
        "tokens per optimizer step; sets gradient_accumulation_steps to it / (batch_size * block_size), whatever "
        "that was set to; 0 = unused",
    )
    batch_size: int = opt(12, "sequences per micro-step per process")
    block_size: int = opt(1024, "context length in tokens")
    sampler: str = opt("random", "'random' windows (nanoGPT) or 'epoch' (each window once per epoch)")
    # model
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    dropout: float = opt(0.0, "dropout probability (0 for pretraining, 0.1+ for finetuning)")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers")
    pos_emb: str = opt("learned", "position embeddings: 'learned' (GPT-2's table) or 'rope' (rotary on q and k)")
    norm: str = opt("layernorm", "'layernorm' (GPT-2) or 'rmsnorm'")
    activation: str = opt("gelu", "MLP: 'gelu' (GPT-2), 'relu2' (ReLU squared) or 'swiglu' (hidden 8/3 n_embd, to 64)")
    qk_norm: bool = opt(False, "RMSNorm on each head's queries and keys before attention")
    n_kv_head: int | None = opt(None, "key/value heads (grouped-query attention, must divide n_head); None = n_head")
    tie_weights: bool = opt(True, "share the token embedding with the output layer (GPT-2); False = untied head")
    logit_softcap: float = opt(0.0, "soft-cap the logits to (-c, c) by c * tanh(logits / c); 0 = off")
    # optimizer
    learning_rate: float = opt(6e-4, "peak learning rate")
    max_iters: int = opt(600000, "optimizer steps to train for")
    weight_decay: float = opt(1e-1, "AdamW weight decay on matrices")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    optimizer: str = opt(
        "adamw", "'adamw', or 'muon': Muon for the blocks' weight matrices, AdamW (learning_rate) for the rest"
    )
    muon_lr: float = opt(0.02, "Muon's peak learning rate; the schedule scales it as it scales learning_rate")
    muon_momentum: float = opt(0.95, "Muon's (Nesterov) momentum")
    muon_ns_steps: int = opt(5, "Muon's Newton-Schulz iterations per update (fewer: cheaper, less orthogonal)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = no clipping")
    skip_nonfinite: bool = opt(False, "skip steps with a non-finite loss or gradient instead of stopping")
    # learning rate schedule
    decay_lr: bool = opt(True, "warm up, then cosine-decay the learning rate; False = constant")
    warmup_iters: int = opt(2000, "linear warmup steps")
    lr_decay_iters: int = opt(600000, "step at which the decay reaches min_lr (usually max_iters)")
    min_lr: float = opt(6e-5, "learning rate at the end of the decay (about learning_rate / 10)")
    lr_schedule: str = opt(
        "cosine",
        "'cosine', or 'wsd' (warmup-stable-decay: warmup, constant, then linear to min_lr over the last "
        "decay_frac of lr_decay_iters)",
    )
    decay_frac: float = opt(0.2, "wsd: the fraction of lr_decay_iters spent decaying")
    # system
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: str = opt(
        "auto", "auto (bfloat16 where supported, float16 on older GPUs, float32 on CPU), float32, bfloat16, float16"
    )
    compile: bool = opt(True, "torch.compile the model (PyTorch 2)")
    parallel: str = opt(
        "ddp",
        "with several processes (torchrun): 'ddp' (a full copy of the model on each) or 'fsdp' (FSDP2: "
        "weights, gradients and optimizer state sharded; checkpoints are folders, ckpt.dcp; runs in one process too)",
    )
    activation_checkpointing: bool = opt(
        False, "recompute each block's activations in backward: less memory, a third more compute"
    )
    seed: int = opt(1337, "seed for initialisation, dropout and the data order")
    peak_flops: float = opt(0.0, "device peak FLOP/s for MFU; 0 = known GPU table or a measured matmul")

    def __post_init__(self) -> None:
        positive = ["eval_interval", "log_interval", "gradient_accumulation_steps", "batch_size", "block_size",
                    "n_layer", "n_head", "n_embd", "muon_ns_steps"]  # fmt: skip
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}")
        for key in (
            "eval_iters",
            "eval_sample_tokens",
            "total_batch_size",
            "max_iters",
            "warmup_iters",
            "lr_decay_iters",
            "weight_decay",
            "grad_clip",
            "min_lr",
        ):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must not be negative, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.decay_lr and self.min_lr > self.learning_rate:  # a constant rate never reaches min_lr
            raise UserError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}); lower min_lr")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        ckpt_io.check_init_from(self.init_from, ("scratch", "resume", "auto"))
        if self.sampler not in ("random", "epoch"):
            raise UserError(f"sampler must be 'random' or 'epoch', got {self.sampler!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"backend must be auto, nccl or gloo, got {self.backend!r}")
        parallel.check_mode(self.parallel, self.dtype)
        try:  # the model options' own checks, as configuration errors
            GPTConfig(n_head=self.n_head, n_embd=self.n_embd, **{k: getattr(self, k) for k in MODEL_OPTIONS})
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise UserError("optimizer='muon' needs whole weight matrices; use it with parallel='ddp', not 'fsdp'")
        if not self.muon_lr > 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(
                f"muon_lr must be positive and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}"
            )
        if self.lr_schedule not in ("cosine", "wsd"):
            raise UserError(f"lr_schedule must be 'cosine' or 'wsd', got {self.lr_schedule!r}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise UserError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        micro_tokens = self.batch_size * self.block_size
        if self.total_batch_size % micro_tokens:
            nearest = max(1, round(self.total_batch_size / micro_tokens)) * micro_tokens
            raise UserError(
                f"total_batch_size ({self.total_batch_size}) must be a multiple of batch_size * block_size "
                f"({self.batch_size} * {self.block_size} = {micro_tokens} tokens per micro-step); "
                f"e.g. --total_batch_size={nearest}"
            )


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM, after saving a checkpoint when there was progress to
    keep (saved_at: its step, else None); exit code 128 + signal."""

    def __init__(self, signum: int, saved_at: int | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.saved_at = signum, saved_at


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Learning rate at step it: linear warmup (nonzero at step 0), then cosine decay to min_lr at
    lr_decay_iters, or (wsd) constant until decay_start = max(warmup_iters, lr_decay_iters -
    int(decay_frac * lr_decay_iters)) and linear from learning_rate there to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, cfg.lr_decay_iters - int(cfg.decay_frac * cfg.lr_decay_iters))
        if it < decay_start:
            return cfg.learning_rate
        ratio = (it - decay_start) / (cfg.lr_decay_iters - decay_start)  # 0 -> 1
        return cfg.learning_rate + ratio * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict[str, np.ndarray], offsets: dict[str, np.ndarray],
                  rt: Runtime, block_size: int, caught: list[int] | None = None) -> dict[str, float] | None:  # fmt: skip
    """Mean loss per split over its fixed eval batches; batches are shared out over ranks.

    Every rank runs the same number of forward passes (under FSDP each one is collective):
    where the batches do not divide evenly, ranks short of one repeat a batch with weight 0.
    A signal (caught non-empty on any rank) abandons the evaluation within one batch: None.
    """
    model.eval()
    out = {}
    for split, data in splits.items():
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (loss * tokens, tokens)
        n_batches = len(offsets[split])
        rounds = -(-n_batches // rt.world_size)
        long_eval = rounds >= 500 and rt.master and show_progress()  # e.g. eval_iters=0 on a big split
        for r in tqdm(range(rounds), desc=f"eval {split}", unit="batch", leave=False, disable=not long_eval):
            if caught is not None and _any_rank(bool(caught), rt):
                model.train()
                return None
            i = r * rt.world_size + rt.rank
            x, y = ds.get_batch(data, offsets[split][min(i, n_batches - 1)], block_size, rt.device)
            with rt.autocast():
                _, loss = model(x, y)
            n = (y != -1).sum() * (i < n_batches)
            total += torch.stack([loss.double() * n, n.double()])
        if rt.distributed:
            torch.distributed.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, wandb."""

    def __init__(self, out_dir: Path, enabled: bool, cfg: TrainConfig) -> None:
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


def _signal_catcher() -> tuple[list[int], dict[int, Any]]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (main thread only)."""
    caught: list[int] = []
    previous: dict[int, Any] = {}
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: _on_signal(caught, signum))
    return caught, previous


def _on_signal(caught: list[int], signum: int) -> None:
    caught.append(signum)
    if len(caught) > 1:  # a second Ctrl-C means: stop now, without the checkpoint
        raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def checkpoint_path(out_dir: Path, name: str, sharded: bool) -> Path:
    """Where checkpoint name (ckpt.pt, best.pt) lives: the file, or under FSDP its folder (ckpt.dcp)."""
    return out_dir / (ckpt_io.sharded_name(name) if sharded else name)


def _resume_state(cfg: TrainConfig, explicit: set[str], out_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Load out_dir/ckpt.pt (under FSDP the non-tensor part of ckpt.dcp); its architecture (and
    seed) win unless set explicitly, and an explicit architecture key that disagrees is an error."""
    sharded = cfg.parallel == "fsdp"
    path, other = checkpoint_path(out_dir, "ckpt.pt", sharded), checkpoint_path(out_dir, "ckpt.pt", not sharded)
    if not _has_checkpoint(out_dir, sharded):
        raise UserError(f"init_from=resume but there is no checkpoint at {path}; " + _other_format_hint(other, cfg))
    state = ckpt_io.load_train_state(path) if sharded else ckpt_io.load_checkpoint(path)
    if not sharded and "optimizer" not in state:
        raise UserError(
            f"{path} has no optimizer state (consolidate.py --optimizer=False), so training cannot continue "
            "exactly from it; consolidate again without --optimizer=False"
        )
    older = {k: getattr(GPTConfig, k) for k in MODEL_OPTIONS}  # keys a checkpoint older than them lacks
    arch = {**older, **state["model_args"]}
    changes = _adopt_architecture(cfg, explicit, arch, "the checkpoint's", "drop the override to resume")
    if "dropout" not in explicit and "dropout" in arch:
        changes["dropout"] = arch["dropout"]
    if "seed" not in explicit and "seed" in state["config"]:
        changes["seed"] = state["config"]["seed"]
    return dataclasses.replace(cfg, **changes), state


def _has_checkpoint(out_dir: Path, sharded: bool) -> bool:
    path = checkpoint_path(out_dir, "ckpt.pt", sharded)
    return ckpt_io.is_sharded(path) if sharded else path.is_file()


def _other_format_hint(other: Path, cfg: TrainConfig) -> str:
    """What to do when out_dir holds a checkpoint of the other kind (single file vs sharded folder)."""
    if cfg.parallel == "fsdp" and other.is_file():
        return f"{other} is a single-file checkpoint (from ddp or one process): resume it with --parallel=ddp"
    if cfg.parallel != "fsdp" and ckpt_io.is_sharded(other):
        return (
            f"{other} is a sharded checkpoint: resume it with --parallel=fsdp, or make a single file of it "
            f"first (python consolidate.py --out_dir={cfg.out_dir})"
        )
    return "train with init_from=scratch first"


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step over all processes: gradient_accumulation_steps, or derived
    from total_batch_size when that is set (it wins: a config file's gradient_accumulation_steps,
    e.g. config/train_gpt2.py's 40, then needs no override)."""
    steps, micro_tokens = cfg.gradient_accumulation_steps, cfg.batch_size * cfg.block_size
    if cfg.total_batch_size:
        steps = cfg.total_batch_size // micro_tokens  # a multiple, checked in TrainConfig
    if steps % world_size == 0:
        return steps
    if cfg.total_batch_size:
        multiple = micro_tokens * world_size
        raise UserError(
            f"total_batch_size={cfg.total_batch_size} makes {steps} micro-steps of batch_size * block_size = "
            f"{micro_tokens} tokens, which {world_size} processes cannot share evenly; make total_batch_size a "
            f"multiple of {multiple} (e.g. --total_batch_size={max(1, round(steps / world_size)) * multiple})"
        )
    raise UserError(
        f"gradient_accumulation_steps ({steps}) must be divisible by the world size ({world_size}); "
        f"use a multiple of {world_size}"
    )


def _pretrained_state(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, GPT]:
    """Load pretrained weights (GPT-2 or another run's checkpoint); their architecture wins over defaults,
    an explicit key that disagrees is an error, except a smaller block_size (the model is cropped to it later)."""
    source = ckpt_io.run_checkpoint(cfg.init_from)
    model = ckpt_io.load_pretrained(cfg.init_from, cfg.dropout) if source is None else _run_model(source, cfg)
    arch = dataclasses.asdict(model.config)
    fix = "drop the override (only block_size may be set, and only smaller)"
    changes = _adopt_architecture(cfg, explicit, arch, f"{cfg.init_from}'s", fix, smaller_block_ok=True)
    return dataclasses.replace(cfg, **changes), model


def _adopt_architecture(cfg: TrainConfig, explicit: set[str], arch: dict[str, Any], whose: str, fix: str,
                        smaller_block_ok: bool = False) -> dict[str, Any]:  # fmt: skip
    """The architecture keys to take from a source model: each one not set explicitly; an explicit
    value that disagrees is an error (except, where allowed, a smaller block_size: the model is cropped)."""
    changes = {}
    for key in ARCH_KEYS[:-1]:  # vocab_size is not a config key
        value = arch[key]
        if key not in explicit:
            changes[key] = value
        elif getattr(cfg, key) != value and not (smaller_block_ok and key == "block_size" and cfg.block_size < value):
            raise UserError(f"--{key}={getattr(cfg, key)} conflicts with {whose} {key}={value}; {fix}")
    return changes


def _run_model(source: Path, cfg: TrainConfig) -> GPT:
    """Another run's model, for a new run from its weights (fresh optimizer and schedule), if its
    vocabulary is the dataset's and the new run would not overwrite its checkpoints."""
    if source.resolve().parent == Path(cfg.out_dir).resolve():
        raise UserError(
            f"init_from={cfg.init_from} is in this run's own out_dir; continue that run with init_from=resume, "
            "or give the new run another out_dir"
        )
    model, source_meta = ckpt_io.load_run_model(source, cfg.dropout)
    ds.check_same_vocab(source_meta, ds.load_meta(ds.dataset_dir(cfg.dataset)), str(source), cfg.dataset)
    return model


def train(cfg: TrainConfig, explicit: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run training (or eval_only) as cfg says; return the final metrics.

    explicit names the keys the user set on the command line or in config files; on resume
    the checkpoint's architecture wins over defaults but must agree with explicit keys.
    """
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.backend, group=cfg.parallel == "fsdp")
    try:
        return _train(cfg, set(explicit), rt)
    finally:
        teardown(rt)


def _train(cfg: TrainConfig, explicit: set[str], rt: Runtime) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    sharded = cfg.parallel == "fsdp"  # then there is always a process group, of one process at least
    parallel.check_mode(cfg.parallel, rt.dtype)
    if sharded:
        _recover_sharded(out_dir, rt)
    state, pretrained = None, None
    if cfg.init_from == "auto":
        found = _has_checkpoint(out_dir, sharded)
        if rt.master:
            print(f"init_from=auto: {'resuming from' if found else 'no checkpoint at'} "
                  f"{checkpoint_path(out_dir, 'ckpt.pt', sharded)}{'' if found else ', starting from scratch'}")  # fmt: skip
        cfg = dataclasses.replace(cfg, init_from="resume" if found else "scratch")
    if cfg.init_from == "resume":
        cfg, state = _resume_state(cfg, explicit, out_dir)
    elif cfg.init_from != "scratch":
        cfg, pretrained = _pretrained_state(cfg, explicit)
    cfg = dataclasses.replace(cfg, gradient_accumulation_steps=accumulation_steps(cfg, rt.world_size))
    micro_per_rank = cfg.gradient_accumulation_steps // rt.world_size

    # Data: check everything before any work starts.
    folder = ds.dataset_dir(cfg.dataset)
    meta = ds.load_meta(folder)
    vocab_size = meta["vocab_size"] if meta else ds.GPT2_VOCAB_SIZE
    if state is not None:
        vocab_size = state["model_args"]["vocab_size"]
    if pretrained is not None:
        vocab_size = _pretrained_vocab(pretrained, meta, cfg)
    example_len = ds.example_length(meta, cfg.block_size, cfg.dataset)  # 0, or windows are whole examples
    splits = {s: ds.open_split(folder, s, cfg.dataset, vocab_size, meta) for s in ("train", "val")}
    for split, data in splits.items():
        if len(data) <= cfg.block_size + 1:
            raise UserError(
                f"block_size ({cfg.block_size}) is not shorter than the {split} split ({len(data)} tokens); lower block_size"
            )
    sampler = ds.BatchSampler(len(splits["train"]), cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps,
                              cfg.seed, cfg.sampler, example_len)  # fmt: skip
    eval_splits = splits if cfg.eval_train else {"val": splits["val"]}
    eval_offsets = {
        s: ds.eval_offsets(len(d), cfg.block_size, cfg.batch_size, cfg.eval_iters, example_len)
        for s, d in eval_splits.items()
    }

    # Output folder: must be writable before we spend time training.
    if rt.master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            for stale in out_dir.glob(".*.pt.tmp*"):  # left by a save that was killed midway
                stale.unlink()
        except OSError as e:
            raise UserError(f"out_dir {out_dir} is not writable: {e.strerror}") from None

    # Model: the same initial weights on every rank (FSDP shards them as they are, DDP would
    # broadcast rank 0's), then a seed per rank for distinct dropout masks.
    torch.manual_seed(cfg.seed)
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=vocab_size, dropout=cfg.dropout)  # fmt: skip
    model_args.update({k: getattr(cfg, k) for k in MODEL_OPTIONS})
    if state is not None:  # keys TrainConfig does not have (gelu_approximate) come from the checkpoint
        model_args = {**state["model_args"], **model_args}
    if pretrained is not None:
        model = pretrained
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        model_args = dataclasses.asdict(model.config)  # recorded in checkpoints, so resume rebuilds this model
    else:
        model = GPT(GPTConfig(**model_args))
    torch.manual_seed(cfg.seed + rt.rank)
    resume_path = checkpoint_path(out_dir, "ckpt.pt", sharded)
    if state is not None and not sharded:
        ckpt_io.load_weights(model, state["model"], resume_path)
    model.to(rt.device)
    if rt.master and not cfg.eval_only:
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ckpt_io.check_free_space(out_dir, 2 * 3 * n_bytes)  # ckpt.pt + best.pt, each weights + 2 Adam moments
    if cfg.activation_checkpointing:
        parallel.checkpoint_activations(model)
    if sharded:
        parallel.shard(model, rt)
        rt.cast_by_fsdp = True  # its mixed-precision policy computes in bfloat16; autocast would only add casts

    scaler = rt.grad_scaler()
    if cfg.optimizer == "muon":  # Muon for the blocks' matrices, AdamW for the rest, behind one optimizer
        optimizer = optim.configure_muon(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                         rt.device_type, cfg.muon_lr, cfg.muon_momentum, cfg.muon_ns_steps)  # fmt: skip
    else:
        optimizer = model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type
        )
    iter_num, best_val_loss, best_iter = 0, float("inf"), None
    if state is not None:
        if sharded:
            changed = optim.load_moments(optimizer, lambda: ckpt_io.load_sharded(resume_path, model, optimizer))
        else:
            changed = optim.load_moments(
                optimizer, lambda: ckpt_io.load_optimizer(optimizer, state["optimizer"], resume_path)
            )
        if changed and rt.master:
            print(f"note: optimizer settings differ from the checkpoint's; this run's apply: {', '.join(changed)}")
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss = (
            state["iter_num"],
            float(state.get("best_val_loss", float("inf"))),
        )  # nanoGPT: a tensor
        best_iter = state.get("best_iter")
        if "rng" in state:
            rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
            if len(rngs) == rt.world_size:  # another world size cannot continue the same dropout streams
                ckpt_io.set_rng_state(rngs[rt.rank])
            elif rt.master:
                print(f"note: the checkpoint was written by {len(rngs)} processes, this run has {rt.world_size}: "
                      "same data order, but new dropout random streams")  # fmt: skip
    raw_model = model  # under FSDP the sharded model itself: checkpoints and sampling go through it
    if cfg.compile:
        model = torch.compile(model)
    mode = cfg.parallel if rt.distributed else None  # how gradients meet: None, 'ddp' or 'fsdp'
    if mode == "ddp":
        model = parallel.wrap_ddp(model, rt)

    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    peak = Peak(None, "only rank 0 reports MFU")
    if rt.master:
        with ckpt_io.isolated_rng():
            peak = peak_flops(rt, cfg.peak_flops)
    with ckpt_io.isolated_rng():  # wandb.init must not move the training RNG streams either
        log = MetricsLog(out_dir, rt.master, cfg)
    if rt.master:
        _banner(cfg, raw_model, rt, tokens_per_step, micro_per_rank, splits)
        shown = f"{peak.flops / 1e12:.3g} TFLOP/s" if peak.flops else "unknown, so no MFU"
        print(f"peak: {shown} ({peak.source}); {raw_model.flops_per_token() / 1e6:.3g} MFLOP per token")

    def save(name: str, evaluated: bool) -> None:
        """Collective: every rank hands over its RNG state; rank 0 writes the file, or under
        FSDP every rank writes its shards into the checkpoint folder."""
        rngs = [ckpt_io.rng_state()]
        if rt.distributed:
            rngs = [None] * rt.world_size
            torch.distributed.all_gather_object(rngs, ckpt_io.rng_state())
        train_state = {
            "scaler": scaler.state_dict(),
            "model_args": model_args,
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "best_iter": best_iter,
            "config": dataclasses.asdict(cfg),
            **ckpt_io.tokenizer_record(meta),  # the vocabulary, so sample.py decodes without the dataset folder
            "rng": rngs,
            "evaluated": evaluated,  # whether the eval at iter_num is done (resume skips it then)
        }
        path = checkpoint_path(out_dir, name, sharded)
        if sharded:
            ckpt_io.save_sharded(path, raw_model, optimizer, {**train_state, "world_size": rt.world_size}, rt.master)
        elif rt.master:
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}
            ckpt_io.save_checkpoint(state, path)

    caught, previous = _signal_catcher()
    t_start = time.time()
    t_last, iter_last = time.perf_counter(), iter_num  # the log line's speed: steps since then
    last: dict[str, Any] = {}
    tokens_seen = iter_num * tokens_per_step
    first_iter = iter_num
    losses: dict[str, float] = {}
    eval_time = 0.0

    def stop(signum: int) -> None:
        """Save the state of this step as the resume point (collective), unless nothing was trained yet."""
        saved_at = None
        if iter_num > 0 and not cfg.eval_only:
            save("ckpt.pt", evaluated=False)
            saved_at = iter_num
            if rt.master:
                saved = checkpoint_path(out_dir, "ckpt.pt", sharded)
                print(f"caught {signal.Signals(signum).name}: saved {saved} at step {iter_num}")
        if rt.distributed:
            torch.distributed.barrier()
        raise Interrupted(signum, saved_at)

    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            resumed_here = state is not None and iter_num == first_iter and state.get("evaluated") and not cfg.eval_only
            skip_start = iter_num == 0 and not cfg.eval_at_start and not cfg.eval_only
            due = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
            if due and not resumed_here and not skip_start:
                t_eval = time.perf_counter()
                evaluated = estimate_loss(model, eval_splits, eval_offsets, rt, cfg.block_size, caught)
                if evaluated is None:  # a signal: a cluster's grace period is shorter than a long evaluation
                    if rt.master:
                        print(f"caught a signal during the evaluation at step {iter_num}: abandoned it")
                    stop(caught[0] if caught else signal.SIGTERM)  # this rank may not have got the signal itself
                losses = evaluated
                improved = losses["val"] < best_val_loss
                if improved:
                    best_val_loss, best_iter = losses["val"], iter_num
                if rt.master:
                    print(f"step {iter_num}: " + ", ".join(f"{split} loss {v:.4f}" for split, v in losses.items()))
                    log.write({"iter": iter_num, "train_loss": losses.get("train"), "val_loss": losses["val"], "lr": lr,
                               "tokens_seen": tokens_seen, "elapsed_s": round(time.time() - t_start, 3)})  # fmt: skip
                # Under FSDP every forward pass is collective, so every rank generates the (same) sample.
                if cfg.eval_sample_tokens and (rt.master or sharded):
                    with ckpt_io.isolated_rng():
                        text = eval_sample(raw_model, meta, cfg.eval_sample_tokens, rt)
                    if rt.master:
                        print(f"sample at step {iter_num}:\n{text}\n---------------")
                        log.write_text(iter_num, text)
                if cfg.plot and log.enabled:
                    with ckpt_io.isolated_rng():
                        refresh_plot(out_dir)
                if iter_num > 0 and not cfg.eval_only:
                    if cfg.always_save_checkpoint or improved:
                        save("ckpt.pt", evaluated=True)
                    if improved:
                        save("best.pt", evaluated=True)
                if rt.distributed:
                    torch.distributed.barrier()  # no rank races past a checkpoint being written
                eval_time += time.perf_counter() - t_eval
                t_last, iter_last = time.perf_counter(), iter_num  # evaluation time is not training time
            if iter_num >= cfg.max_iters or cfg.eval_only:
                break

            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(micro_per_rank):
                offsets = sampler.offsets(iter_num, rt.rank * micro_per_rank + micro)
                x, y = ds.get_batch(splits["train"], offsets, cfg.block_size, rt.device)
                # Gradients are averaged over ranks only after the last micro-step; before, they accumulate.
                with parallel.grad_sync(model, raw_model, mode, sync=micro == micro_per_rank - 1):
                    with rt.autocast():
                        _, loss = model(x, y)
                        loss = loss / micro_per_rank  # each rank averages its micro-steps; DDP/FSDP average ranks
                    loss_sum += loss.detach()
                    scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = parallel.full_value(grad_norm)  # under FSDP a DTensor: the norm over all shards
            stop_asked = _stop_requested(loss_sum, caught, rt)  # also averages loss_sum over ranks
            # With float16 the GradScaler owns non-finite gradients: its step() skips them and lowers the scale.
            finite = math.isfinite(loss_sum.item()) and (scaler.is_enabled() or math.isfinite(grad_norm.item()))
            if not finite and not cfg.skip_nonfinite:
                raise UserError(
                    f"non-finite loss or gradient at step {iter_num} (loss {loss_sum.item()}); "
                    "the last good checkpoint is untouched. Lower learning_rate, or set skip_nonfinite=True"
                )
            if finite:
                scaler.step(optimizer)
                scaler.update()
            else:
                if scaler.is_enabled():
                    scaler.update()  # lowers the scale, and closes this step's unscale_ so the next may call it
                if rt.master:
                    print(f"step {iter_num}: skipped (non-finite loss or gradient)")
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            tokens_seen += tokens_per_step

            if iter_num % cfg.log_interval == 0 and rt.master:
                now = time.perf_counter()
                dt = (now - t_last) / (iter_num - iter_last)  # after an eval or a resume, fewer than log_interval
                t_last, iter_last = now, iter_num
                tps = tokens_per_step / dt
                mfu = peak.mfu(raw_model.flops_per_token() * tps / rt.world_size)
                step_loss = loss_sum.item()
                eta = (cfg.max_iters - iter_num) * dt
                shown = f"{mfu * 100:.2f}%" if mfu is not None else "n/a"
                print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, "
                      f"{tps:,.0f} tok/s, mfu {shown}, eta {_duration(eta)}")  # fmt: skip
                last = {"iter": iter_num, "loss": step_loss, "lr": lr, "tokens_per_sec": tps, "mfu": mfu}
                log.write(last)
            if stop_asked:
                stop(caught[0] if caught else signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.close()

    elapsed = time.time() - t_start
    steps = iter_num - first_iter
    train_time = max(elapsed - eval_time, 1e-9)
    tps = steps * tokens_per_step / train_time if steps else 0.0
    summary = {
        "iter": iter_num,
        "train_loss": losses.get("train"),
        "val_loss": losses.get("val"),
        "best_val_loss": best_val_loss,
        "best_iter": best_iter,
        "tokens_seen": tokens_seen,
        "elapsed_s": elapsed,
        "eval_s": eval_time,
        "tokens_per_sec": tps,  # mean over the training time, evaluations left out
        "mfu": peak.mfu(raw_model.flops_per_token() * tps / rt.world_size) if steps else None,
        "loss": last.get("loss"),
        "checkpoint": str(checkpoint_path(out_dir, "ckpt.pt", sharded)),
    }
    if rt.master and not cfg.eval_only:
        _print_summary(summary, steps, cfg)
    return summary


def _any_rank(flag: bool, rt: Runtime) -> bool:
    """Whether flag is set on any rank (collective when distributed: every rank must call it)."""
    if not rt.distributed:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def _stop_requested(loss_sum: torch.Tensor, caught: list[int], rt: Runtime) -> bool:
    """Average loss_sum over ranks in place, and tell every rank whether any of them caught a
    signal: saving is collective, so all must stop at the same step."""
    if not rt.distributed:
        return bool(caught)
    stats = torch.stack([loss_sum, loss_sum.new_tensor(float(bool(caught)))])
    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.AVG)
    loss_sum.copy_(stats[0])
    return stats[1].item() > 0


def _recover_sharded(out_dir: Path, rt: Runtime) -> None:
    """Rank 0 repairs sharded checkpoints whose save was killed midway, before anyone reads them."""
    if rt.master and out_dir.is_dir():
        for name in ("ckpt.pt", "best.pt"):
            ckpt_io.recover_sharded(checkpoint_path(out_dir, name, sharded=True))
    torch.distributed.barrier()


def _pretrained_vocab(model: GPT, meta: dict[str, Any] | None, cfg: TrainConfig) -> int:
    """The pretrained model's vocab_size, after checking the dataset's tokens mean the same to it."""
    vocab = model.config.vocab_size
    if meta is None and vocab < ds.GPT2_BPE_TOKENS:
        raise UserError(
            f"dataset '{cfg.dataset}' is GPT-2 BPE (no meta.pkl), but {cfg.init_from} has a vocabulary of {vocab}"
        )
    if meta is not None and meta["vocab_size"] != vocab:
        raise UserError(
            f"dataset '{cfg.dataset}' has its own vocabulary of {meta['vocab_size']} (meta.pkl), but {cfg.init_from} "
            f"has {vocab}; pretrained GPT-2 needs GPT-2 BPE data (a dataset without meta.pkl)"
        )
    return vocab


def _print_summary(s: dict[str, Any], steps: int, cfg: TrainConfig) -> None:
    best = f"{s['best_val_loss']:.4f} at step {s['best_iter']}" if s["best_iter"] is not None else "none"
    mfu = (
        f", MFU {s['mfu'] * 100:.1f}%"
        if s["mfu"] is not None
        else (", MFU unknown (see 'peak:' above)" if steps else "")
    )
    print(f"done: {steps} steps in {_duration(s['elapsed_s'])} ({_duration(s['eval_s'])} of it evaluating)")
    last = [f"{split} {s[split + '_loss']:.4f}" for split in ("train", "val") if s[split + "_loss"] is not None]
    print(f"  best val loss {best}" + (f"; last: {', '.join(last)}" if last else ""))
    print(f"  tokens seen {s['tokens_seen']:,}; {s['tokens_per_sec']:,.0f} tokens/s while training{mfu}")
    saved = Path(s["checkpoint"])
    best = saved.with_name("best" + saved.suffix)
    print(f"  checkpoints: {saved if saved.exists() else 'none written'}"
          + (f", best: {best}" if best.exists() else ""))  # fmt: skip
    if saved.suffix == ckpt_io.SHARDED_SUFFIX:
        print(f"  next: python consolidate.py --out_dir={cfg.out_dir}, then python sample.py --out_dir={cfg.out_dir}")
    else:
        print(f"  next: python sample.py --out_dir={cfg.out_dir}")


def eval_sample(model: GPT, meta: dict[str, Any] | None, max_new_tokens: int, rt: Runtime) -> str:
    """A short sample from a fixed seed and start token, so samples of successive evals compare."""
    encode, decode = ds.get_tokenizer(meta)
    if meta is None:
        start = [ds.GPT2_BPE_TOKENS - 1]  # <|endoftext|>: a document starts after it
    else:
        start = encode("\n") if "\n" in meta.get("stoi", {}) else [0]
    x = torch.tensor([start], dtype=torch.long, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(1337)
    was_training = model.training
    model.eval()
    with torch.no_grad(), rt.autocast():
        y = model.generate(x, max_new_tokens, temperature=0.8, top_k=200, generator=generator)
    model.train(was_training)
    return decode(y[0, len(start) :].tolist())


def refresh_plot(out_dir: Path) -> None:
    """Redraw out_dir/loss.png; a plotting problem never stops training."""
    try:
        from plot import plot_runs

        plot_runs([out_dir], out_dir / "loss.png")
    except Exception as e:  # matplotlib missing or broken, odd fonts, a full disk: keep training
        print(f"warning: could not draw {out_dir / 'loss.png'}: {e}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _banner(cfg: TrainConfig, model: GPT, rt: Runtime, tokens_per_step: int, micro_per_rank: int,
            splits: dict[str, np.ndarray]) -> None:  # fmt: skip
    changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != f.default]  # fmt: skip
    print("config:", ", ".join(changed) or "defaults")
    n_all, n_body = model.get_num_params(non_embedding=False), model.get_num_params()
    print(f"model: {n_all / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without position embeddings)")
    mode = f" ({cfg.parallel})" if rt.distributed else ""
    print(f"device: {rt.device}, dtype: {rt.dtype}, world size: {rt.world_size}{mode}, "
          f"tokens per step: {tokens_per_step:,} ({micro_per_rank} micro-steps per rank)")  # fmt: skip
    print("data: " + ", ".join(f"{s} {len(d):,} tokens" for s, d in splits.items()))


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        argv = sys.argv[1:] if argv is None else argv
        explicit = read_overrides(TrainConfig, argv)
        cfg = TrainConfig(**explicit)
        try:
            train(cfg, set(explicit))
        except Interrupted as e:
            hint = "resume with --init_from=resume" if e.saved_at is not None else "nothing was trained, nothing saved"
            print(f"{e}; {hint}", file=sys.stderr)
            sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
