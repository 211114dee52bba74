"""Everything the init_from key means: where a run's weights (and state) come from.

'scratch' builds a new model; 'resume' continues out_dir's checkpoint (its architecture wins
over defaults, an explicit key that disagrees is an error); 'auto' is 'resume' when out_dir
holds a checkpoint, else 'scratch'; gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face
folder start from OpenAI's weights; another run's ckpt.pt (or out_dir) starts a new run from
its weights. sample.py takes 'resume' (out_dir/ckpt) or GPT-2 weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import data as ds
from gptsmith.configurator import UserError
from gptsmith.hf import GPT2_NAMES, pretrained
from gptsmith.model import GPT, MODEL_OPTIONS, GPTConfig

# The keys that fix the architecture a checkpoint records (a checkpoint older than MODEL_OPTIONS means their defaults).
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", *MODEL_OPTIONS, "vocab_size")


@dataclass
class Start:
    """Where a training run starts: its config with the source's architecture adopted, and the
    checkpoint to resume (state) or the pretrained model to start from, or neither (scratch)."""

    cfg: Any  # TrainConfig
    state: dict[str, Any] | None = None
    pretrained: GPT | None = None


def resolve(cfg: Any, explicit: set[str], out_dir: Path, master: bool) -> Start:
    """The Start that cfg.init_from names (reads checkpoints, loads pretrained weights). Under FSDP only
    the first process (master) reads pretrained weights: the others take the model's shapes, on the
    meta device, and receive their shards from it (parallel.load_from_first)."""
    sharded = cfg.sharded
    if cfg.init_from == "auto":
        found = ckpt_io.has_checkpoint(out_dir, sharded)
        if master:
            print(
                f"init_from=auto: {'resuming from' if found else 'no checkpoint at'} "
                f"{ckpt_io.checkpoint_path(out_dir, 'ckpt.pt', sharded)}{'' if found else ', starting from scratch'}"
            )
        cfg = dataclasses.replace(cfg, init_from="resume" if found else "scratch")
    if cfg.init_from == "resume":
        return Start(*_resume_state(cfg, explicit, out_dir))
    if cfg.init_from != "scratch":
        cfg, model = _pretrained_state(cfg, explicit, weights=master or not sharded)
        return Start(cfg, pretrained=model)
    return Start(cfg)


def is_pretrained(init_from: str) -> bool:
    """Whether init_from names pretrained weights: a GPT-2 hub name, an existing local folder
    (Hugging Face model or another run's out_dir) or a checkpoint file."""
    return init_from in GPT2_NAMES or Path(init_from).is_dir() or run_checkpoint(init_from) is not None


def run_checkpoint(init_from: str) -> Path | None:
    """The gptsmith checkpoint that init_from names, to start a new run from: a checkpoint file,
    or another run's out_dir (its ckpt.pt); None for GPT-2 names and Hugging Face folders."""
    path = Path(init_from)
    if path.is_file():
        return path
    # A Hugging Face model folder has config.json; an out_dir has ckpt.pt, or ckpt.dcp under FSDP
    # (then load_checkpoint says how to consolidate it).
    out_dir = path.is_dir() and not (path / "config.json").exists()
    if out_dir and ((path / "ckpt.pt").is_file() or ckpt_io.is_sharded(path / ckpt_io.sharded_name("ckpt.pt"))):
        return path / "ckpt.pt"
    return None


def check_init_from(init_from: str, modes: tuple[str, ...]) -> None:
    """Accept one of modes (e.g. 'scratch', 'resume') or pretrained weights; otherwise a UserError naming the options."""
    if init_from not in modes and not is_pretrained(init_from):
        options = ", ".join(f"'{m}'" for m in (*modes, *GPT2_NAMES))
        raise UserError(
            f"init_from must be {options}, the path of a Hugging Face model folder, or a checkpoint (a ckpt.pt "
            f"file or another run's out_dir), got {init_from!r} (no such file or folder)"
        )


def load_run_model(path: Path, dropout: float, weights: bool = True) -> tuple[GPT, dict[str, Any] | None]:
    """Another run's model from its checkpoint, with this run's dropout, and its vocabulary (meta).
    weights=False: the model's shapes only, on the meta device (the file's tensors are not read)."""
    state = ckpt_io.load_checkpoint(path, mmap=not weights)
    state["model_args"] = {**state["model_args"], "dropout": dropout}  # dropout is a training choice, not architecture
    if weights:
        model = ckpt_io.model_from_checkpoint(state, path)
    else:
        with torch.device("meta"):
            model = ckpt_io.build_model(state["model_args"], path)
    return model, ckpt_io.checkpoint_vocab(state, path)


def load_pretrained(init_from: str, dropout: float = 0.0, weights: bool = True) -> GPT:
    """GPT-2 weights for sampling, failures as UserError; a gptsmith checkpoint is read from its out_dir instead."""
    source = run_checkpoint(init_from)
    if source is not None:  # train.py loads these itself; elsewhere (sample.py) they are read from out_dir
        raise UserError(
            f"{init_from} is a gptsmith checkpoint, not GPT-2 weights; load it with --out_dir={source.parent} "
            f"--ckpt={source.name}"
        )
    return pretrained(init_from, dropout, weights=weights)


def _resume_state(cfg: Any, explicit: set[str], out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load out_dir/ckpt.pt (under FSDP the non-tensor part of ckpt.dcp); its architecture (and
    seed) win unless set explicitly, and an explicit architecture key that disagrees is an error."""
    sharded = cfg.sharded
    path = ckpt_io.checkpoint_path(out_dir, "ckpt.pt", sharded)
    other = ckpt_io.checkpoint_path(out_dir, "ckpt.pt", not sharded)
    if not ckpt_io.has_checkpoint(out_dir, sharded):
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


def _other_format_hint(other: Path, cfg: Any) -> str:
    """What to do when out_dir holds a checkpoint of the other kind (single file vs sharded folder)."""
    if cfg.sharded and other.is_file():
        return f"{other} is a single-file checkpoint (from ddp or one process): resume it with --parallel=ddp"
    if not cfg.sharded and ckpt_io.is_sharded(other):
        return (
            f"{other} is a sharded checkpoint: resume it with --parallel=fsdp, or make a single file of it "
            f"first (python consolidate.py --out_dir={cfg.out_dir})"
        )
    return "train with init_from=scratch first"


def _pretrained_state(cfg: Any, explicit: set[str], weights: bool = True) -> tuple[Any, GPT]:
    """Load pretrained weights (GPT-2 or another run's checkpoint); their architecture wins over defaults,
    an explicit key that disagrees is an error, except a smaller block_size (the model is cropped to it later)."""
    source = run_checkpoint(cfg.init_from)
    if source is None:
        model = load_pretrained(cfg.init_from, cfg.dropout, weights=weights)
    else:
        model = _run_model(source, cfg, weights=weights)
    arch = dataclasses.asdict(model.config)
    fix = "drop the override (only block_size may be set, and only smaller)"
    changes = _adopt_architecture(cfg, explicit, arch, f"{cfg.init_from}'s", fix, smaller_block_ok=True)
    return dataclasses.replace(cfg, **changes), model


def _adopt_architecture(
    cfg: Any, explicit: set[str], arch: dict[str, Any], whose: str, fix: str, smaller_block_ok: bool = False
) -> dict[str, Any]:
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


def _run_model(source: Path, cfg: Any, weights: bool = True) -> GPT:
    """Another run's model, for a new run from its weights (fresh optimizer and schedule), if its
    vocabulary is the dataset's and the new run would not overwrite its checkpoints."""
    if source.resolve().parent == Path(cfg.out_dir).resolve():
        raise UserError(
            f"init_from={cfg.init_from} is in this run's own out_dir; continue that run with init_from=resume, "
            "or give the new run another out_dir"
        )
    model, source_meta = load_run_model(source, cfg.dropout, weights=weights)
    ds.check_same_vocab(source_meta, ds.load_meta(ds.dataset_dir(cfg.dataset)), str(source), cfg.dataset)
    return model


def pretrained_vocab(model: GPT, meta: dict[str, Any] | None, cfg: Any) -> int:
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
