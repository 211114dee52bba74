"""Train a GPT, nanoGPT-style: build a run, then fit it.

    python train.py config/shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallel=fsdp

build_run() turns a TrainConfig into a Run (config -> runtime -> data -> model -> optimizer ->
restored state), and fit() is the loop: evaluate when due, train_step, log when due, stop when
asked. What the loop carries from step to step and a checkpoint restores is one TrainState.

Every key, its default and meaning: python train.py --help
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gptsmith import checkpoint as ckpt_io
from gptsmith import data as ds
from gptsmith import generated, init_from, optim, parallel
from gptsmith.config import PROFILE_AFTER_STEPS, TrainConfig
from gptsmith.configurator import UserError, cli_errors, read_overrides, show_progress
from gptsmith.metrics import MetricsLog, Profiler, Speedometer, duration, print_banner, print_summary, refresh_plot
from gptsmith.model import GPT
from gptsmith.optim import get_lr
from gptsmith.runtime import Peak, Runtime, choose_training_dtype, peak_flops, setup_runtime, teardown
from gptsmith.sampler import eval_sample


@dataclass
class TrainState:
    """The loop's state: saved in every checkpoint and restored on resume, as one unit."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int | None = None
    tokens_seen: int = 0
    evaluated: bool = False  # whether the evaluation at iter_num is done (a resume then skips it)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], tokens_per_step: int) -> TrainState:
        """The state a checkpoint records; nanoGPT's lack some keys (and keep best_val_loss as a tensor)."""
        iter_num = state["iter_num"]
        return cls(
            iter_num=iter_num,
            best_val_loss=float(state.get("best_val_loss", math.inf)),
            best_iter=state.get("best_iter"),
            tokens_seen=state.get("tokens_seen", iter_num * tokens_per_step),
            evaluated=bool(state.get("evaluated")),
        )


@dataclass
class TrainData:
    """The dataset as training reads it: token splits, the seeded batch sampler, fixed eval batches."""

    meta: dict[str, Any] | None  # the vocabulary (meta.pkl), None = GPT-2 BPE
    vocab_size: int
    splits: dict[str, Any]
    sampler: ds.BatchSampler
    eval_offsets: dict[str, np.ndarray]  # per evaluated split: (n_batches, batch_size) window starts
    steps: generated.SortedSteps | None = None  # a generated dataset's training micro-batches, sorted by length

    def share_computed(self) -> float:
        """The share of the configured token positions that training runs through the model
        (below 1 where a generated dataset's micro-batches are trimmed): MFU counts only those."""
        return self.steps.share_computed() if self.steps else 1.0


@dataclass
class StepReport:
    """What the host learns about a step once the device is done with it."""

    iter_num: int
    loss: float  # mean over micro-steps and ranks
    finite: bool  # loss and gradient finite (float16: the loss; the GradScaler skips gradients)
    stop_asked: bool  # distributed: some rank caught a signal (one process: run.caught says at once)


class StepHealth:
    """Each step's [loss, non-finite, stop asked] tensor stays on the device and is copied to the
    host without waiting (into pinned memory on CUDA, with an event); push() returns the previous
    step's report, which the device has finished long before, so the host never stalls the queue.
    flush() waits for the latest step: at log steps, before evaluations and at the end."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.pending: tuple[int, torch.Tensor, Any] | None = None

    def push(self, iter_num: int, health: torch.Tensor) -> StepReport | None:
        previous = self.flush()
        if self.cuda:
            host = torch.empty(health.shape, dtype=health.dtype, pin_memory=True)
            host.copy_(health, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = health.detach().to("cpu", copy=True), None
        self.pending = (iter_num, host, event)
        return previous

    def flush(self) -> StepReport | None:
        if self.pending is None:
            return None
        iter_num, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        values = host.numpy()
        stop_asked = len(values) > 2 and values[2] > 0
        return StepReport(iter_num, float(values[0]), finite=not values[1] > 0, stop_asked=bool(stop_asked))


@dataclass
class Run:
    """Everything a training run is made of, built once by build_run()."""

    cfg: TrainConfig
    rt: Runtime
    data: TrainData
    model: torch.nn.Module  # what forward and backward run through: compiled and/or DDP-wrapped
    raw_model: GPT  # the model itself (under FSDP sharded): checkpoints and samples go through it
    optimizer: Any
    scaler: torch.amp.GradScaler
    peak: Peak
    log: MetricsLog
    health: StepHealth  # each step's loss and health, read by the host one step late
    weights: optim.MasterWeights | None = None  # master_weights=True: the bfloat16 copies model runs through
    caught: list[int] = field(default_factory=list)  # signals received (SignalCatcher fills it)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def sharded(self) -> bool:
        return self.cfg.sharded

    @property
    def model_args(self) -> dict[str, Any]:
        """The architecture, recorded in checkpoints so that resume rebuilds this model."""
        return dataclasses.asdict(self.raw_model.config)

    @property
    def mode(self) -> str | None:
        """How gradients meet: None (one process), 'ddp' or 'fsdp'."""
        return self.cfg.parallel if self.rt.distributed else None

    @property
    def micro_per_rank(self) -> int:
        return self.cfg.gradient_accumulation_steps // self.rt.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step()

    def mfu(self, tokens_per_sec: float) -> float | None:
        """MFU of a training speed in tokens/s (all ranks'), per device, counting only the token
        positions the model ran (a generated dataset's trimmed padding is not work done)."""
        flops = self.raw_model.flops_per_token() * tokens_per_sec * self.data.share_computed()
        return self.peak.mfu(flops / self.rt.world_size)

    def should_eval(self, state: TrainState) -> bool:
        """Every eval_interval steps and at the last; before the first unless eval_at_start=False;
        not again at a step whose evaluation a resumed checkpoint already holds."""
        cfg = self.cfg
        if cfg.eval_only:
            return True
        if state.evaluated or (state.iter_num == 0 and not cfg.eval_at_start):
            return False
        return state.iter_num % cfg.eval_interval == 0 or state.iter_num == cfg.max_iters

    def should_log(self, state: TrainState) -> bool:
        return self.rt.master and state.iter_num % self.cfg.log_interval == 0

    def profile_steps(self, first_iter: int) -> range:
        """The steps profile=N runs under the profiler (on rank 0): N from PROFILE_AFTER_STEPS steps after
        the run's first, when compiling and recording CUDA graphs are over. Empty when off."""
        start = first_iter + PROFILE_AFTER_STEPS
        return range(start, start + (self.cfg.profile if self.rt.master else 0))


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM, after saving a checkpoint when there was progress to
    keep (saved_at: its step, else None); exit code 128 + signal."""

    def __init__(self, signum: int, saved_at: int | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.saved_at = signum, saved_at


# --- building a run ------------------------------------------------------------------------------


def build_run(cfg: TrainConfig, explicit: set[str], rt: Runtime) -> tuple[Run, TrainState]:
    """config -> data -> model -> optimizer -> restored state, each checked before any training."""
    out_dir = Path(cfg.out_dir)
    parallel.check_mode(cfg.parallel, rt.dtype)
    if cfg.sharded:
        _recover_sharded(out_dir, rt)
    start = init_from.resolve(cfg, explicit, out_dir, rt.master)
    model_config = start.pretrained.config if start.pretrained is not None else start.cfg.gpt_config(vocab_size=1)
    choose_training_dtype(rt, start.cfg.dtype, model_config, start.cfg.batch_size)
    cfg = dataclasses.replace(start.cfg, gradient_accumulation_steps=start.cfg.accumulation_steps(rt.world_size))
    data = open_data(cfg, start)
    _check_out_dir(out_dir, rt)
    model = build_model(cfg, start, data.vocab_size, rt)
    optimizer = optim.build_optimizer(model, vars(cfg), rt.device_type)
    scaler = rt.grad_scaler()
    state = TrainState()
    if start.state is not None:
        state = restore(start.state, model=model, optimizer=optimizer, scaler=scaler, rt=rt, cfg=cfg)
    raw_model, forward_model = model, model
    weights = optim.master_weights(model, rt) if cfg.master_weights else None
    if weights is not None:
        forward_model = weights.compute
    mode = cfg.compile_mode_for(rt.distributed)
    if cfg.compile and mode != cfg.compile_mode and rt.master:
        print(
            f"compile_mode={cfg.compile_mode!r} records CUDA graphs, not with {cfg.parallel.upper()}: compiling in 'default'"
        )
    if cfg.compile and not cfg.sharded:  # (under FSDP build_model compiled each block)
        # One graph for the whole model, shapes fixed: every batch has the same (B, T).
        forward_model = torch.compile(forward_model, mode=mode, fullgraph=True, dynamic=False)
    if rt.distributed and cfg.parallel == "ddp":
        forward_model = parallel.wrap_ddp(forward_model, rt, static_graph=not cfg.activation_checkpointing)
    peak = Peak(None, "only rank 0 reports MFU")
    with ckpt_io.isolated_rng():  # measuring and wandb.init must not move the training random streams
        if rt.master:
            peak = peak_flops(rt, cfg.peak_flops)
        log = MetricsLog(out_dir, rt.master, cfg)
    run = Run(
        cfg=cfg,
        rt=rt,
        data=data,
        model=forward_model,
        raw_model=raw_model,
        optimizer=optimizer,
        scaler=scaler,
        peak=peak,
        log=log,
        health=StepHealth(rt.device),
        weights=weights,
    )
    if rt.master:
        print_banner(cfg, run)
    return run, state


def open_data(cfg: TrainConfig, start: init_from.Start) -> TrainData:
    """The dataset's splits, checked (ids within the vocabulary, windows fit), the sampler and eval batches."""
    folder = ds.dataset_dir(cfg.dataset)
    generator = generated.generator_path(folder)
    if generator is not None:
        return open_generated(cfg, start, generator)
    meta = ds.load_meta(folder)
    vocab_size = _vocab_size(cfg, start, meta)
    example_len = ds.example_length(meta, cfg.block_size, cfg.dataset)  # 0, or windows are whole examples
    splits = {s: ds.open_split(folder, s, cfg.dataset, vocab_size, meta) for s in ("train", "val")}
    for split, tokens in splits.items():
        if len(tokens) <= cfg.block_size + 1:
            raise UserError(
                f"block_size ({cfg.block_size}) is not shorter than the {split} split ({len(tokens)} tokens); "
                "lower block_size"
            )
    sampler = ds.BatchSampler(
        n_tokens=len(splits["train"]),
        block_size=cfg.block_size,
        batch_size=cfg.batch_size,
        micro_steps=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
        mode=cfg.sampler,
        example_len=example_len,
    )
    eval_offsets = {
        s: ds.eval_offsets(len(splits[s]), cfg.block_size, cfg.batch_size, cfg.eval_iters, example_len)
        for s in cfg.evaluated_splits()
    }
    return TrainData(meta=meta, vocab_size=vocab_size, splits=splits, sampler=sampler, eval_offsets=eval_offsets)


def _vocab_size(cfg: TrainConfig, start: init_from.Start, meta: dict[str, Any] | None) -> int:
    """The model's vocabulary: a pretrained model's (checked against the data's), a resumed
    checkpoint's, or the dataset's (its meta, else GPT-2's BPE)."""
    if start.pretrained is not None:
        return init_from.pretrained_vocab(start.pretrained, meta, cfg)
    if start.state is not None:
        return start.state["model_args"]["vocab_size"]
    return meta["vocab_size"] if meta else ds.GPT2_VOCAB_SIZE


def open_generated(cfg: TrainConfig, start: init_from.Start, path: Path) -> TrainData:
    """A dataset made on the fly by its generate.py: each row of a batch is a key drawn from
    (seed, step, micro-step) as a token file's windows are, and the generator's example for it."""
    module = generated.load_generator(path, cfg.dataset)
    splits = {s: generated.GeneratedSplit(module, s, path) for s in ("train", "val")}
    meta = splits["train"].meta
    ds.example_length(meta, cfg.block_size, cfg.dataset)  # block_size must be the generator's
    if cfg.sampler != "random":
        raise UserError(f"dataset '{cfg.dataset}' is generated, so it has no epochs: use sampler='random'")
    if cfg.eval_iters == 0:
        raise UserError(f"dataset '{cfg.dataset}' is generated and never ends: set eval_iters > 0")
    vocab_size = _vocab_size(cfg, start, module.meta)
    sampler = ds.BatchSampler(
        n_tokens=generated.KEY_RANGE,
        block_size=0,
        batch_size=cfg.batch_size,
        micro_steps=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
        example_len=1,  # a "window" is one key
    )
    eval_offsets = {
        s: generated.eval_keys(cfg.eval_iters, cfg.batch_size, ds.EVAL_SEED) for s in cfg.evaluated_splits()
    }
    # A compiled model (dynamic=False) would recompile at every new length: trimmed rows only in eager mode.
    steps = generated.SortedSteps(splits["train"], sampler, trim=not cfg.compile)
    return TrainData(
        meta=module.meta, vocab_size=vocab_size, splits=splits, sampler=sampler, eval_offsets=eval_offsets, steps=steps
    )


def _check_out_dir(out_dir: Path, rt: Runtime) -> None:
    """out_dir must be writable before we spend time training; remove what killed saves left."""
    if not rt.master:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for stale in out_dir.glob(".*.pt.tmp*"):
            stale.unlink()
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable: {e.strerror}") from None


def build_model(cfg: TrainConfig, start: init_from.Start, vocab_size: int, rt: Runtime) -> GPT:
    """The model on its device (sharded under FSDP), with a checkpoint's weights when resuming.

    Every rank builds the same initial weights (FSDP shards them as they are, DDP would broadcast
    rank 0's), then reseeds by rank for distinct dropout masks. Under FSDP a new model is built on
    the meta device and each rank draws only its shards (parallel.materialize): neither host nor
    device ever holds the whole model, only its shards plus one module's full weights. Pretrained
    weights under FSDP are read by rank 0 alone, which sends each rank its shards tensor by tensor
    (parallel.load_from_first); the other ranks never hold more than one full tensor."""
    torch.manual_seed(cfg.seed)
    on_meta = cfg.sharded and start.pretrained is None
    first_weights = None  # under FSDP, the pretrained weights rank 0 holds ({} on the other ranks)
    if start.pretrained is not None:
        model = start.pretrained
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        if cfg.sharded:  # sharded as the shapes alone, like a new model, then given rank 0's weights
            first_weights = {} if model.lm_head.weight.is_meta else model.state_dict()
            with torch.device("meta"):
                model = GPT(model.config)
    else:
        config = cfg.gpt_config(vocab_size, cfg.dropout)
        if start.state is not None:  # what no config key sets (GPT-2's tanh GELU) comes from the checkpoint
            config.gelu_approximate = start.state["model_args"].get("gelu_approximate", config.gelu_approximate)
        with torch.device("meta") if on_meta else nullcontext():
            model = GPT(config)
    if start.state is not None and not cfg.sharded:
        ckpt_io.load_weights(model, start.state["model"], ckpt_io.checkpoint_path(Path(cfg.out_dir), "ckpt.pt", False))
    if not cfg.sharded:
        model.to(rt.device)
    if rt.master and not cfg.eval_only:
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ckpt_io.check_free_space(Path(cfg.out_dir), 2 * 3 * n_bytes)  # ckpt.pt + best.pt, weights + 2 Adam moments
    if cfg.activation_checkpointing:
        parallel.checkpoint_activations(model)
    if cfg.sharded:
        if cfg.compile:
            parallel.compile_blocks(model, mode=cfg.compile_mode_for(rt.distributed))
        parallel.shard(model, rt)
        if on_meta:
            parallel.materialize(model, rt, cfg.seed)
        elif first_weights is not None:
            parallel.load_from_first(model, first_weights, rt)
        rt.weights_in_dtype = True  # its mixed-precision policy computes in bfloat16
    torch.manual_seed(cfg.seed + rt.rank)
    return model


def restore(
    state: dict[str, Any],
    *,
    model: GPT,
    optimizer: Any,
    scaler: torch.amp.GradScaler,
    rt: Runtime,
    cfg: TrainConfig,
) -> TrainState:
    """Everything but the weights from a checkpoint (under FSDP the weights too): the optimizer's
    moments (its settings stay this run's), the loss scale, the loop state and the random streams."""
    path = ckpt_io.checkpoint_path(Path(cfg.out_dir), "ckpt.pt", cfg.sharded)
    if cfg.sharded:
        changed = optim.load_moments(optimizer, lambda: ckpt_io.load_sharded(path, model, optimizer))
    else:
        changed = optim.load_moments(optimizer, lambda: ckpt_io.load_optimizer(optimizer, state["optimizer"], path))
    if changed and rt.master:
        print(f"note: optimizer settings differ from the checkpoint's; this run's apply: {', '.join(changed)}")
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == rt.world_size:  # another world size cannot continue the same dropout streams
            ckpt_io.set_rng_state(rngs[rt.rank])
        elif rt.master:
            print(
                f"note: the checkpoint was written by {len(rngs)} processes, this run has {rt.world_size}: "
                "same data order, but new dropout random streams"
            )
    return TrainState.from_checkpoint(state, cfg.tokens_per_step())


def _recover_sharded(out_dir: Path, rt: Runtime) -> None:
    """Rank 0 repairs sharded checkpoints whose save was killed midway, before anyone reads them."""
    if rt.master and out_dir.is_dir():
        for name in ("ckpt.pt", "best.pt"):
            ckpt_io.recover_sharded(ckpt_io.checkpoint_path(out_dir, name, sharded=True))
    torch.distributed.barrier()


# --- the loop ------------------------------------------------------------------------------------


def fit(run: Run, state: TrainState) -> dict[str, Any]:
    """Train until max_iters (or evaluate once, eval_only); return the run's summary."""
    cfg = run.cfg
    clock, first_iter, t_start = Speedometer(state.iter_num), state.iter_num, time.time()
    eval_time, losses, last = 0.0, {}, {}
    profiled = run.profile_steps(first_iter)
    profiler = Profiler(run.rt, trace=run.out_dir / "profile_trace.json")
    with SignalCatcher(run.caught):
        try:
            while True:
                lr = set_lr(run, state.iter_num)
                if run.should_eval(state):
                    check_step(run, run.health.flush())  # a bad step must not reach a checkpoint
                    t_eval = time.perf_counter()
                    losses = evaluate(run, state, lr, elapsed=time.time() - t_start)
                    eval_time += time.perf_counter() - t_eval
                    clock.mark(state.iter_num)  # evaluation time is not training time
                if state.iter_num >= cfg.max_iters or cfg.eval_only:
                    break
                if state.iter_num == profiled.start and profiled:
                    profiler.start()
                stop_asked = check_step(run, train_step(run, state))  # the previous step's report
                if run.should_log(state):
                    report = run.health.flush()  # this step's figures: the only wait for the device
                    stop_asked |= check_step(run, report)
                    last = log_step(run, state, report.loss, lr, clock)
                if profiler.running and state.iter_num == profiled.stop:
                    profiler.stop(len(profiled), "steps")
                    clock.mark(state.iter_num)  # nor is writing the profile's report
                if stop_asked or (bool(run.caught) and not run.rt.distributed):
                    stop(run, state)
            check_step(run, run.health.flush())
            if profiler.running:  # the run ended inside the span
                profiler.stop(state.iter_num - profiled.start, "steps")
            elif profiled and state.iter_num <= profiled.start:
                print(f"profile: nothing profiled, the run ended before step {profiled.start}")
        finally:
            run.log.close()
    return summarize(
        run,
        state,
        steps=state.iter_num - first_iter,
        elapsed=time.time() - t_start,
        eval_time=eval_time,
        losses=losses,
        last=last,
    )


def set_lr(run: Run, iter_num: int) -> float:
    lr = get_lr(iter_num, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr  # Muon's groups scale it by their lr_scale
    return lr


def train_step(run: Run, state: TrainState) -> StepReport | None:
    """One optimizer step over all micro-steps, queued without waiting for the device.

    Whether the step is healthy (finite loss and gradient) is decided on the device, which skips
    the update itself when it is not (optim.step_unless); the host learns it, and the mean loss
    and (distributed) whether any rank caught a signal, one step later from run.health: the
    report returned is the previous step's, or None."""
    cfg, rt, model = run.cfg, run.rt, run.model
    loss_sum = torch.zeros((), device=rt.device)
    batch = _train_batch(run, state, 0)
    for micro in range(run.micro_per_rank):
        x, y, divisor = batch
        # Gradients are averaged over ranks only after the last micro-step; before, they accumulate.
        with parallel.grad_sync(model, run.raw_model, run.mode, sync=micro == run.micro_per_rank - 1):
            with rt.autocast():
                _, loss = model(x, y, return_logits=False)
                loss = loss / divisor  # the micro-batch's part of its rank's mean; DDP/FSDP average ranks
            if micro + 1 < run.micro_per_rank:  # gathered and sent while the device works on this one
                batch = _train_batch(run, state, micro + 1)
            loss_sum += loss.detach()
            run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = parallel.full_value(grad_norm)  # under FSDP a DTensor: the norm over all shards
    # With float16 the GradScaler owns non-finite gradients: its step() skips them and lowers the scale.
    finite = loss_sum.isfinite() if run.scaler.is_enabled() else loss_sum.isfinite() & grad_norm.isfinite()
    health = [loss_sum, (~finite).float()]
    if rt.distributed:  # agree on the loss, the step's health and a stop, in one collective on the device
        health.append(torch.full((), float(bool(run.caught)), device=rt.device))
    health = torch.stack(health)
    if rt.distributed:
        torch.distributed.all_reduce(health, op=torch.distributed.ReduceOp.AVG)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # skips on the device too, with a fused optimizer
        run.scaler.update()
    else:
        optim.step_unless(run.optimizer, health[1] > 0)
    run.optimizer.zero_grad(set_to_none=True)
    if run.weights is not None:
        run.weights.sync()
    report = run.health.push(state.iter_num, health)
    state.iter_num += 1
    state.tokens_seen += run.tokens_per_step
    state.evaluated = False
    return report


def _train_batch(run: Run, state: TrainState, micro: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Micro-step micro of this rank in the current step, a pure function of (seed, step, micro-step):
    inputs, targets, and what to divide its mean loss by. Token files' micro-batches all hold
    batch_size x block_size targets, so each is divided by the micro-steps; a generated dataset's
    hold as many targets as their examples do and weigh by their share of the step's targets
    (times the ranks, which DDP/FSDP average), so the step's loss is the mean over all its targets."""
    index = run.rt.rank * run.micro_per_rank + micro
    if run.data.steps is not None:
        host, share = run.data.steps.micro_batch(state.iter_num, index)
        x, y = ds.to_device(torch.from_numpy(host), run.rt.device)
        return x, y, 1 / (share * run.rt.world_size)
    offsets = run.data.sampler.offsets(state.iter_num, index)
    x, y = ds.get_batch(run.data.splits["train"], offsets, run.cfg.block_size, run.rt.device)
    return x, y, run.micro_per_rank


def check_step(run: Run, report: StepReport | None) -> bool:
    """Act on a finished step's report: stop on a non-finite one (its update was skipped on the
    device), or report it skipped with skip_nonfinite; return whether to stop for a signal."""
    if report is None:
        return False
    if not report.finite:
        if not run.cfg.skip_nonfinite:
            raise UserError(
                f"non-finite loss or gradient at step {report.iter_num} (loss {report.loss}); "
                "the last good checkpoint is untouched. Lower learning_rate, or set skip_nonfinite=True"
            )
        if run.rt.master:
            print(f"step {report.iter_num}: skipped (non-finite loss or gradient)")
    return report.stop_asked


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float] | None:
    """Mean loss per split over its fixed eval batches; batches are shared out over ranks.

    Every rank runs the same number of forward passes (under FSDP each one is collective):
    where the batches do not divide evenly, ranks short of one repeat a batch with weight 0.
    A signal (on any rank) abandons the evaluation within one batch: None.
    """
    rt, model = run.rt, run.model
    model.eval()
    out = {}
    for split, offsets in run.data.eval_offsets.items():
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (loss * tokens, tokens)
        n_batches = len(offsets)
        rounds = -(-n_batches // rt.world_size)
        # A bar for evaluations that take a while (eval_iters=0 on a big split, a big model on a CPU).
        bar = tqdm(range(rounds), desc=f"eval {split}", unit="batch", leave=False, delay=5.0,
                   disable=not (rt.master and show_progress()))  # fmt: skip
        for r in bar:
            if _any_rank(bool(run.caught), rt):
                model.train()
                return None
            i = r * rt.world_size + rt.rank
            x, y = ds.get_batch(run.data.splits[split], offsets[min(i, n_batches - 1)], run.cfg.block_size, rt.device)
            with rt.autocast():
                _, loss = model(x, y, return_logits=False)
            n = (y != -1).sum() * (i < n_batches)
            total += torch.stack([loss.double() * n, n.double()])
        if rt.distributed:
            torch.distributed.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def evaluate(run: Run, state: TrainState, lr: float, elapsed: float) -> dict[str, float]:
    """Estimate the losses, report them (line, metrics.jsonl, sample, loss.png) and save the checkpoints due."""
    cfg, rt = run.cfg, run.rt
    losses = estimate_loss(run)
    if losses is None:  # a signal: a cluster's grace period is shorter than a long evaluation
        if rt.master:
            print(f"caught a signal during the evaluation at step {state.iter_num}: abandoned it")
        stop(run, state)
    improved = losses["val"] < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_iter = losses["val"], state.iter_num
    state.evaluated = True
    if rt.master:
        print(f"step {state.iter_num}: " + ", ".join(f"{split} loss {v:.4f}" for split, v in losses.items()))
        run.log.write(
            {
                "iter": state.iter_num,
                "train_loss": losses.get("train"),
                "val_loss": losses["val"],
                "lr": lr,
                "tokens_seen": state.tokens_seen,
                "elapsed_s": round(elapsed, 3),
            }
        )
    # Under FSDP every forward pass is collective, so every rank generates the (same) sample.
    if cfg.eval_sample_tokens and (rt.master or run.sharded):
        with ckpt_io.isolated_rng():
            text = eval_sample(run.raw_model, run.data.meta, cfg.eval_sample_tokens, rt)
        if rt.master:
            print(f"sample at step {state.iter_num}:\n{text}\n---------------")
            run.log.write_text(state.iter_num, text)
    if cfg.plot and run.log.enabled:
        with ckpt_io.isolated_rng():
            refresh_plot(run.out_dir)
    if state.iter_num > 0 and not cfg.eval_only:
        if cfg.always_save_checkpoint or improved:
            save(run, state, "ckpt.pt")
        if improved:
            save(run, state, "best.pt")
    if rt.distributed:
        torch.distributed.barrier()  # no rank races past a checkpoint being written
    return losses


def log_step(run: Run, state: TrainState, step_loss: float, lr: float, clock: Speedometer) -> dict[str, Any]:
    """nanoGPT's log line (plus tokens/s and the time left), and its record in metrics.jsonl."""
    dt = clock.lap(state.iter_num)
    tps = run.tokens_per_step / dt
    mfu = run.mfu(tps)
    eta = clock.eta(run.cfg.max_iters - state.iter_num)
    shown = f"{mfu * 100:.2f}%" if mfu is not None else "n/a"
    print(
        f"iter {state.iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, "
        f"{tps:,.0f} tok/s, mfu {shown}, eta {duration(eta)}"
    )
    record = {"iter": state.iter_num, "loss": step_loss, "lr": lr, "tokens_per_sec": tps, "mfu": mfu}
    run.log.write(record)
    return record


def save(run: Run, state: TrainState, name: str) -> None:
    """Checkpoint name (ckpt.pt or best.pt) of this run. Collective: every rank hands over its RNG
    state; rank 0 writes the file, or under FSDP every rank writes its shards into the folder."""
    rt = run.rt
    rngs = [ckpt_io.rng_state()]
    if rt.distributed:
        rngs = [None] * rt.world_size
        torch.distributed.all_gather_object(rngs, ckpt_io.rng_state())
    train_state = {
        "scaler": run.scaler.state_dict(),
        "model_args": run.model_args,
        **dataclasses.asdict(state),
        "config": dataclasses.asdict(run.cfg),
        **ckpt_io.tokenizer_record(run.data.meta),
        "rng": rngs,
    }
    if run.sharded:
        train_state["world_size"] = rt.world_size
    path = ckpt_io.checkpoint_path(run.out_dir, name, run.sharded)
    ckpt_io.save_state(path, run.raw_model, run.optimizer, train_state, sharded=run.sharded, master=rt.master)


def stop(run: Run, state: TrainState) -> None:
    """Save this step's state as the resume point (unless nothing was trained yet) and raise Interrupted."""
    signum = run.caught[0] if run.caught else signal.SIGTERM  # this rank may not have got the signal itself
    saved_at = None
    if state.iter_num > 0 and not run.cfg.eval_only:
        save(run, state, "ckpt.pt")
        saved_at = state.iter_num
        if run.rt.master:
            saved = ckpt_io.checkpoint_path(run.out_dir, "ckpt.pt", run.sharded)
            print(f"caught {signal.Signals(signum).name}: saved {saved} at step {state.iter_num}")
    if run.rt.distributed:
        torch.distributed.barrier()
    raise Interrupted(signum, saved_at)


def summarize(
    run: Run,
    state: TrainState,
    steps: int,
    elapsed: float,
    eval_time: float,
    losses: dict[str, float],
    last: dict[str, Any],
) -> dict[str, Any]:
    """The run's final figures (printed by rank 0 after training)."""
    train_time = max(elapsed - eval_time, 1e-9)
    tps = steps * run.tokens_per_step / train_time if steps else 0.0
    summary = {
        "iter": state.iter_num,
        "train_loss": losses.get("train"),
        "val_loss": losses.get("val"),
        "best_val_loss": state.best_val_loss,
        "best_iter": state.best_iter,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": elapsed,
        "eval_s": eval_time,
        "tokens_per_sec": tps,  # mean over the training time, evaluations left out
        "mfu": run.mfu(tps) if steps else None,
        "loss": last.get("loss"),
        "checkpoint": str(ckpt_io.checkpoint_path(run.out_dir, "ckpt.pt", run.sharded)),
    }
    if run.rt.master and not run.cfg.eval_only:
        print_summary(summary, steps, run.cfg.out_dir)
    return summary


# --- signals and agreement between ranks -----------------------------------------------------------


class SignalCatcher:
    """While active, SIGINT/SIGTERM only append to `caught`, which the loop checks after each step
    (and the evaluation after each batch); a second one stops at once. Main thread only."""

    def __init__(self, caught: list[int]) -> None:
        self.caught, self.previous = caught, {}

    def __enter__(self) -> SignalCatcher:
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.caught.append(signum)
        if len(self.caught) > 1:  # a second Ctrl-C means: stop now, without the checkpoint
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _any_rank(flag: bool, rt: Runtime) -> bool:
    """Whether flag is set on any rank (collective when distributed: every rank must call it)."""
    if not rt.distributed:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


# --- the command -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, explicit: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run training (or eval_only) as cfg says; return the final metrics.

    explicit names the keys the user set on the command line or in config files; on resume
    the checkpoint's architecture wins over defaults but must agree with explicit keys.
    """
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.backend, group=cfg.sharded, sdpa_backend=cfg.sdpa_backend)
    try:
        run, state = build_run(cfg, set(explicit), rt)
        return fit(run, state)
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    """python train.py [CONFIG.py ...] [--key=value ...]"""
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
