"""Every command's configuration, built from key groups that each declare their keys once.

A group is a dataclass of keys with their defaults and meanings (opt) and, optionally, a
check() of its own values; a command's config inherits the groups it uses and adds its own
keys. Config files stay flat nanoGPT assignments: the groups only organise the code, and
every key is still set as --key=value (configurator.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptsmith.configurator import UserError, opt
from gptsmith.model import MODEL_OPTIONS, GPTConfig


class KeyGroup:
    """Runs the check() of every group a config is made of, after its fields are set."""

    def __post_init__(self) -> None:
        for cls in reversed(type(self).__mro__):
            if "check" in cls.__dict__:
                cls.check(self)

    def positive(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}")

    def not_negative(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) < 0:
                raise UserError(f"{key} must not be negative, got {getattr(self, key)}")

    def one_of(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise UserError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")


# --- groups shared by several commands -------------------------------------------------------


@dataclass
class RuntimeKeys(KeyGroup):
    """Where and how to compute (runtime.setup_runtime resolves 'auto')."""

    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: str = opt(
        "auto",
        "auto (bfloat16 on GPUs that have it, else float16; on a CPU bfloat16 where it has bfloat16 units and a "
        "block measures faster, else float32), float32, bfloat16, float16",
    )
    seed: int = opt(1337, "seed for initialisation, dropout, the data order and sampling")
    sdpa_backend: str = opt(
        "auto",
        "attention kernels: auto (on Hopper GPUs and newer cuDNN, then flash, efficient, math; elsewhere torch's "
        "choice), or force one: cudnn, flash, efficient (CUDA only), math. CPU training with dropout writes "
        "attention out instead (faster there)",
    )

    def check(self) -> None:
        from gptsmith.runtime import SDPA_BACKENDS

        self.one_of("sdpa_backend", SDPA_BACKENDS)


@dataclass
class ModelKeys(KeyGroup):
    """The model's shape and options (GPTConfig's fields of the same names)."""

    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    block_size: int = opt(1024, "context length in tokens")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers")
    pos_emb: str = opt("learned", "position embeddings: 'learned' (GPT-2's table) or 'rope' (rotary on q and k)")
    norm: str = opt("layernorm", "'layernorm' (GPT-2) or 'rmsnorm'")
    activation: str = opt("gelu", "MLP: 'gelu' (GPT-2), 'relu2' (ReLU squared) or 'swiglu' (hidden 8/3 n_embd, to 64)")
    qk_norm: bool = opt(False, "RMSNorm on each head's queries and keys before attention")
    n_kv_head: int | None = opt(None, "key/value heads (grouped-query attention, must divide n_head); None = n_head")
    tie_weights: bool = opt(True, "share the token embedding with the output layer (GPT-2); False = untied head")
    logit_softcap: float = opt(0.0, "soft-cap the logits to (-c, c) by c * tanh(logits / c); 0 = off")

    def check(self) -> None:
        self.positive("n_layer", "n_head", "n_embd", "block_size")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        try:  # the model options' own checks, as configuration errors
            self.gpt_config(vocab_size=1)
        except ValueError as e:
            raise UserError(str(e)) from None

    def gpt_config(self, vocab_size: int, dropout: float = 0.0) -> GPTConfig:
        """The GPTConfig these keys describe, for a vocabulary of vocab_size."""
        return GPTConfig(
            block_size=self.block_size,
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=dropout,
            bias=self.bias,
            **{k: getattr(self, k) for k in MODEL_OPTIONS},
        )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs


@dataclass
class CompileModeKeys(KeyGroup):
    compile_mode: str = opt(
        "default",
        "torch.compile's mode for the training step, with compile: default; reduce-overhead (forward and backward "
        "replayed as CUDA graphs on GPUs: for small models, whose step waits on the host launching kernels); "
        "max-autotune-no-cudagraphs or max-autotune (matmul kernels tuned at start: minutes more compiling)",
    )

    def check(self) -> None:
        self.one_of("compile_mode", COMPILE_MODES)


@dataclass
class MasterWeightsKeys(KeyGroup):
    master_weights: bool = opt(
        False,
        "with dtype=bfloat16 in one process: forward and backward run through bfloat16 copies of the weights "
        "(so the residual stream is bfloat16 too), gradients add up in float32 and the optimizer updates "
        "float32 master weights, which checkpoints hold (FSDP's mixed precision does this already)",
    )

    def check(self) -> None:
        if self.master_weights and self.dtype in ("float32", "float16"):
            raise UserError(f"master_weights=True needs dtype=bfloat16 (or auto); dtype is {self.dtype}")


@dataclass
class PeakKeys(KeyGroup):
    peak_flops: float = opt(
        0.0, "device peak FLOP/s for MFU; 0 = a known GPU's datasheet, else a matmul measured once per machine"
    )


# train.py starts profiling this many steps into a run: after compiling and recording CUDA graphs.
PROFILE_AFTER_STEPS = 10


@dataclass
class ProfileKeys(KeyGroup):
    profile: int = opt(
        0,
        f"run this many steps under torch.profiler (train.py: starting {PROFILE_AFTER_STEPS} steps into the run, after "
        "compiling, "
        "its trace written to out_dir/profile_trace.json; bench.py: after its timing, steps or, sampling, new "
        "tokens) and print the operators and kernels that took the most time and, on a GPU, the kernels' time per "
        "step (well below the unprofiled time per step: the host is the bottleneck); 0 = off",
    )

    def check(self) -> None:
        self.not_negative("profile")


@dataclass
class CheckpointKeys(KeyGroup):
    """Which checkpoint of a training run to read."""

    out_dir: str = opt("out", "training output folder holding the checkpoint")
    ckpt: str = opt("ckpt.pt", "checkpoint file inside out_dir (ckpt.pt = latest saved, best.pt = best val loss)")

    def checkpoint_path(self) -> Path:
        return Path(self.out_dir) / self.ckpt


# --- train.py ----------------------------------------------------------------------------------


@dataclass
class TrainIOKeys(KeyGroup):
    out_dir: str = opt("out", "folder for checkpoints (ckpt.pt, best.pt) and metrics.jsonl")
    eval_interval: int = opt(2000, "evaluate train/val loss every this many steps (and at the last)")
    log_interval: int = opt(1, "print a log line every this many steps")
    eval_iters: int = opt(200, "batches per loss estimate; 0 = the whole split")
    eval_only: bool = opt(False, "estimate the losses once and exit, without training")
    eval_train: bool = opt(
        True, "estimate the train loss too at each eval; False = val only (saves time with eval_iters=0)"
    )
    eval_at_start: bool = opt(True, "evaluate before the first step, as nanoGPT does; False saves that time")
    always_save_checkpoint: bool = opt(
        True, "write ckpt.pt at every eval, not only when val loss improves (and on a signal, always)"
    )
    init_from: str = opt(
        "scratch",
        "'scratch', 'resume' (from out_dir/ckpt.pt), 'auto' (resume if out_dir holds a checkpoint, else scratch: "
        "for restarts by torchrun --max-restarts or a job scheduler), or pretrained GPT-2: gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl (Hugging Face hub) or the path of a local Hugging Face model folder, or another run's "
        "checkpoint (a ckpt.pt path or its out_dir) to start a new run from its weights",
    )
    wandb_log: bool = opt(False, "log metrics to Weights & Biases")
    wandb_project: str = opt("owt", "wandb project")
    wandb_run_name: str = opt("gpt2", "wandb run name")
    plot: bool = opt(True, "redraw out_dir/loss.png from metrics.jsonl at every eval (python plot.py does it by hand)")
    eval_sample_tokens: int = opt(0, "at every eval, generate this many tokens, print them and log them to wandb")

    def check(self) -> None:
        from gptsmith.init_from import check_init_from

        self.positive("eval_interval", "log_interval")
        self.not_negative("eval_iters", "eval_sample_tokens")
        check_init_from(self.init_from, ("scratch", "resume", "auto"))

    def evaluated_splits(self) -> tuple[str, ...]:
        return ("train", "val") if self.eval_train else ("val",)


@dataclass
class TrainDataKeys(KeyGroup):
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
    sampler: str = opt("random", "'random' windows (nanoGPT) or 'epoch' (each window once per epoch)")
    dropout: float = opt(0.0, "dropout probability (0 for pretraining, 0.1+ for finetuning)")

    def check(self) -> None:
        self.positive("gradient_accumulation_steps", "batch_size")
        self.not_negative("total_batch_size")
        self.one_of("sampler", ("random", "epoch"))
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class OptimizerKeys(KeyGroup):
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
    muon_ns_dtype: str = opt(
        "auto",
        "Muon's Newton-Schulz precision: auto (bfloat16 on GPUs, and on CPUs with bfloat16 units for "
        "matrices at least 256 on both sides; else float32), float32 or bfloat16",
    )
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = no clipping")
    skip_nonfinite: bool = opt(False, "skip steps with a non-finite loss or gradient instead of stopping")

    def check(self) -> None:
        self.positive("muon_ns_steps")
        self.not_negative("max_iters", "weight_decay", "grad_clip")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        self.one_of("optimizer", ("adamw", "muon"))
        self.one_of("muon_ns_dtype", ("auto", "float32", "bfloat16"))
        if not self.muon_lr > 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(
                f"muon_lr must be positive and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}"
            )


@dataclass
class ScheduleKeys(KeyGroup):
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

    def check(self) -> None:
        self.not_negative("warmup_iters", "lr_decay_iters", "min_lr")
        self.one_of("lr_schedule", ("cosine", "wsd"))
        if not 0.0 < self.decay_frac <= 1.0:
            raise UserError(f"decay_frac must be in (0, 1], got {self.decay_frac}")


@dataclass
class SystemKeys(KeyGroup):
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo")
    compile: bool = opt(True, "torch.compile the model (PyTorch 2)")
    parallel: str = opt(
        "ddp",
        "with several processes (torchrun): 'ddp' (a full copy of the model on each) or 'fsdp' (FSDP2: "
        "weights, gradients and optimizer state sharded; checkpoints are folders, ckpt.dcp; runs in one process too)",
    )
    activation_checkpointing: bool = opt(
        False, "recompute each block's activations in backward: less memory, a third more compute"
    )

    def check(self) -> None:
        self.one_of("backend", ("auto", "nccl", "gloo"))


# Bases in reverse order: a dataclass lists the fields of its last base first.
@dataclass
class TrainConfig(
    ProfileKeys,
    MasterWeightsKeys,
    CompileModeKeys,
    PeakKeys,
    RuntimeKeys,
    SystemKeys,
    ScheduleKeys,
    OptimizerKeys,
    ModelKeys,
    TrainDataKeys,
    TrainIOKeys,
):
    """Training configuration: nanoGPT's keys, defaults and meanings, plus a few of our own."""

    def check(self) -> None:
        from gptsmith.parallel import check_mode

        check_mode(self.parallel, self.dtype)
        if self.decay_lr and self.min_lr > self.learning_rate:  # a constant rate never reaches min_lr
            raise UserError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}); lower min_lr")
        if self.master_weights and self.sharded:
            raise UserError("master_weights=True is not for parallel='fsdp', which keeps bfloat16 copies itself")
        if self.optimizer == "muon" and self.sharded:
            raise UserError("optimizer='muon' needs whole weight matrices; use it with parallel='ddp', not 'fsdp'")
        micro_tokens = self.micro_tokens()
        if self.total_batch_size % micro_tokens:
            nearest = max(1, round(self.total_batch_size / micro_tokens)) * micro_tokens
            raise UserError(
                f"total_batch_size ({self.total_batch_size}) must be a multiple of batch_size * block_size "
                f"({self.batch_size} * {self.block_size} = {micro_tokens} tokens per micro-step); "
                f"e.g. --total_batch_size={nearest}"
            )

    def compile_mode_for(self, distributed: bool) -> str:
        """torch.compile's mode for this run. CUDA graphs (reduce-overhead, max-autotune) are recorded only
        in one process without FSDP: DDP's and FSDP's hooks and collectives do not replay inside one (and
        PyTorch has open crashes with them), so there the mode falls back to default."""
        if self.compile_mode in CUDA_GRAPH_MODES and (distributed or self.sharded):
            return "default"
        return self.compile_mode

    @property
    def sharded(self) -> bool:
        """Under FSDP: checkpoints are folders (ckpt.dcp) and there is always a process group."""
        return self.parallel == "fsdp"

    def micro_tokens(self) -> int:
        """Tokens in one micro-step of one process."""
        return self.batch_size * self.block_size

    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step, over every micro-step of every process."""
        return self.gradient_accumulation_steps * self.micro_tokens()

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step over all processes: gradient_accumulation_steps, or derived
        from total_batch_size when that is set (it wins: a config file's gradient_accumulation_steps,
        e.g. config/train_gpt2.py's 40, then needs no override); they must share out evenly."""
        steps = self.gradient_accumulation_steps
        if self.total_batch_size:
            steps = self.total_batch_size // self.micro_tokens()  # a multiple, checked above
        if steps % world_size == 0:
            return steps
        if self.total_batch_size:
            multiple = self.micro_tokens() * world_size
            raise UserError(
                f"total_batch_size={self.total_batch_size} makes {steps} micro-steps of batch_size * block_size = "
                f"{self.micro_tokens()} tokens, which {world_size} processes cannot share evenly; make "
                f"total_batch_size a multiple of {multiple} "
                f"(e.g. --total_batch_size={max(1, round(steps / world_size)) * multiple})"
            )
        raise UserError(
            f"gradient_accumulation_steps ({steps}) must be divisible by the world size ({world_size}); "
            f"use a multiple of {world_size}"
        )


# --- sample.py ---------------------------------------------------------------------------------


@dataclass
class SampleConfig(RuntimeKeys, CheckpointKeys):
    """Sampling configuration."""

    init_from: str = opt(
        "resume",
        "'resume' = the checkpoint out_dir/ckpt, or pretrained GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
        "(Hugging Face hub) or the path of a local Hugging Face model folder",
    )
    dataset: str = opt(
        "",
        "only for checkpoints that do not record their vocabulary (nanoGPT's): the dataset (name under data/ or "
        "folder) whose meta.pkl decodes them; '' = the dataset they were trained on",
    )
    start: str = opt("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = opt(10, "number of samples to draw")
    batch_size: int = opt(
        10, "samples generated side by side (one forward pass for all); lower it if memory runs short"
    )
    max_new_tokens: int = opt(500, "tokens generated per sample")
    temperature: float = opt(0.8, "1.0 = as trained, lower = more conservative, 0 = greedy")
    top_k: int = opt(200, "sample only among the top_k most likely tokens; 0 = all")
    window: str = opt(
        "restart",
        "past block_size tokens: 'restart' from the newest block_size/2 with the KV cache (fast), or 'slide' by one "
        "token, recomputing the newest block_size each time (nanoGPT's: its exact tokens, slower)",
    )
    compile: bool = opt(
        False, "torch.compile the KV-cache decode step and its sampling (a CUDA graph on GPUs; not window=slide)"
    )

    def check(self) -> None:
        from gptsmith.init_from import check_init_from

        check_init_from(self.init_from, ("resume",))
        self.positive("num_samples", "batch_size", "max_new_tokens")
        self.not_negative("temperature", "top_k")
        self.one_of("window", ("restart", "slide"))


# --- bench.py ----------------------------------------------------------------------------------


@dataclass
class BenchConfig(ProfileKeys, MasterWeightsKeys, CompileModeKeys, PeakKeys, RuntimeKeys, ModelKeys):
    """Benchmark configuration: random weights and tokens of the model the keys describe."""

    what: str = opt(
        "train",
        "'train' (forward, backward, optimizer step), 'sample' (KV cache vs recompute), or 'peak' (measure this "
        "machine's matmul peak for MFU again and remember it; run it on an idle machine)",
    )
    vocab_size: int = opt(50304, "vocabulary size (65 for shakespeare_char)")
    batch_size: int = opt(12, "sequences per step (train)")
    steps: int = opt(20, "timed steps (train)")
    warmup: int = opt(5, "untimed steps first: compilation, allocator, caches (train)")
    max_new_tokens: int = opt(500, "tokens to generate (sample)")
    num_samples: int = opt(1, "sequences decoded side by side (sample); tokens/s counts the tokens of all")
    repeats: int = opt(3, "generations per mode; the median is reported (sample)")
    compile: bool = opt(False, "torch.compile the model (train) or the KV-cache decode step (sample)")

    def check(self) -> None:
        self.one_of("what", ("train", "sample", "peak"))
        self.positive("vocab_size", "batch_size", "steps", "max_new_tokens", "num_samples", "repeats")


# --- export_hf.py, consolidate.py, plot.py -------------------------------------------------------


@dataclass
class ExportConfig(CheckpointKeys):
    """Export configuration."""

    hf_dir: str = opt("", "folder to write the Hugging Face model into (required)")
    overwrite: bool = opt(False, "replace hf_dir if it already exists and is not empty")

    def check(self) -> None:
        if not self.hf_dir:
            raise UserError("give the folder to write into: --hf_dir=DIR")


@dataclass
class ConsolidateConfig(CheckpointKeys):
    """Consolidation configuration."""

    ckpt: str = opt(  # the same key as CheckpointKeys', naming the sharded folder here
        "ckpt.dcp", "sharded checkpoint folder inside out_dir: ckpt.dcp (latest) or best.dcp (best val loss)"
    )
    output: str = opt("", "file to write; '' = out_dir/<ckpt>.pt, e.g. ckpt.dcp -> ckpt.pt")
    optimizer: bool = opt(
        True, "include the optimizer state, so training can resume from the file; False = a third of the size"
    )

    def check(self) -> None:
        if not self.ckpt.endswith(".dcp"):
            raise UserError(f"ckpt must name a sharded checkpoint folder ending in .dcp, got {self.ckpt!r}")

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        return Path(self.out_dir) / (Path(self.ckpt).stem + ".pt")


@dataclass
class PlotConfig(KeyGroup):
    """Plot options (the run folders are given as positional arguments)."""

    out: str = opt("", "PNG file to write (default: loss.png in the first run's folder)")
    title: str = opt("", "chart title (default: the run folders' names)")
