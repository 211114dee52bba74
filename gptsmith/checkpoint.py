"""Saving and loading checkpoints so that a crash at any moment leaves a loadable file.

A checkpoint is written to a temporary file beside its target, flushed to disk, then
renamed over the target in one atomic step: readers see the old file or the new one,
never half of one. Only plain Python values and tensors go in, so loading uses
torch.load(weights_only=True) and never runs code from the file. (Pretrained GPT-2 weights
load through hf.py; what init_from names is resolved in init_from.py.)

Under FSDP a checkpoint is a folder, ckpt.dcp/ (best.dcp/), written by every process at
once with torch.distributed.checkpoint (DCP): .metadata and one __<rank>_0.distcp file of
model and optimizer shards per process, plus train_state.pt, the non-tensor state (step,
config, RNG states, ...) that rank 0 writes. It is written as .ckpt.dcp.tmp/ and then
swapped in by two renames (old folder aside, new one in); a save killed at any moment
leaves the previous folder, or both, and recover_sharded() puts the newest complete one
back in place. consolidate() (python consolidate.py) turns such a folder into an ordinary
single-file ckpt.pt.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptsmith import data as ds
from gptsmith.configurator import UserError
from gptsmith.model import GPT, GPTConfig

REQUIRED_KEYS = ("model", "model_args", "iter_num", "config")
TRAIN_STATE = "train_state.pt"  # inside a sharded checkpoint folder: everything but the tensors
SHARDED_SUFFIX = ".dcp"


def checkpoint_path(out_dir: Path, name: str, sharded: bool) -> Path:
    """Where checkpoint name (ckpt.pt, best.pt) lives: the file, or under FSDP its folder (ckpt.dcp)."""
    return out_dir / (sharded_name(name) if sharded else name)


def has_checkpoint(out_dir: Path, sharded: bool) -> bool:
    """Whether out_dir holds a complete ckpt.pt (or, sharded, ckpt.dcp) to resume from."""
    path = checkpoint_path(out_dir, "ckpt.pt", sharded)
    return is_sharded(path) if sharded else path.is_file()


def save_state(
    path: Path, model: torch.nn.Module, optimizer: Any, train_state: dict[str, Any], *, sharded: bool, master: bool
) -> None:
    """Save a training run's state: one file that rank 0 writes, or (sharded) a folder every rank writes its
    shards into. Collective when sharded."""
    if sharded:
        save_sharded(path, model, optimizer, train_state, master)
    elif master:
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}, path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write state to path atomically: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)  # make the rename itself durable


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a UserError naming the file. mmap: the tensors are
    mapped from the file, not read, until used (for a process that needs only the model's shapes)."""
    path = Path(path)
    if not path.is_file():
        sharded = path if path.is_dir() else path.with_suffix(SHARDED_SUFFIX)
        if is_sharded(sharded):
            what = (
                "is a sharded (FSDP) checkpoint folder" if sharded == path else f"is missing, but {sharded} is sharded"
            )
            raise UserError(
                f"no checkpoint file at {path}: it {what}; make a single file of it first: "
                f"python consolidate.py --out_dir={sharded.parent} --ckpt={sharded.name}"
            )
        raise UserError(f"no checkpoint at {path}")
    return _read(path, REQUIRED_KEYS, map_location, mmap)


def _read(path: Path, required: tuple[str, ...], map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load a checkpoint file and check it holds the required keys."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, garbage bytes, foreign pickle: many exception types
        raise UserError(
            f"checkpoint {path} is unreadable (truncated or not a checkpoint): {type(e).__name__}"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise UserError(f"checkpoint {path} is not a gptsmith checkpoint (missing {', '.join(required)})")
    return state


def checkpoint_vocab(state: dict[str, Any], path: str | Path, dataset: str = "") -> dict[str, Any] | None:
    """The vocabulary a checkpoint's token ids mean: its meta.pkl contents, or None for GPT-2 BPE.

    gptsmith checkpoints record it ("meta", and since "tokenizer"), so no dataset folder is read.
    Checkpoints that do not (nanoGPT's) mean the meta.pkl of `dataset`, by default the dataset
    they were trained on (their config's), or GPT-2 BPE where it has none, as nanoGPT's
    sample.py assumes; a model too small for GPT-2 BPE without a meta.pkl is an error.
    """
    if "tokenizer" in state or "meta" in state:
        return state.get("meta")
    name = dataset or str(state.get("config", {}).get("dataset", ""))
    vocab_size = state["model_args"].get("vocab_size", ds.GPT2_VOCAB_SIZE)
    meta = ds.load_meta(ds.dataset_dir(name)) if name else None
    if meta is not None:
        if meta["vocab_size"] != vocab_size:
            raise UserError(
                f"{path} records no vocabulary, and {ds.dataset_dir(name) / 'meta.pkl'} has {meta['vocab_size']} "
                f"tokens where the model has {vocab_size}; pass --dataset= the dataset it was trained on"
            )
        return meta
    if vocab_size >= ds.GPT2_BPE_TOKENS:
        return None
    where = f"{ds.dataset_dir(name) / 'meta.pkl'} is missing" if name else "it names no dataset"
    raise UserError(
        f"{path} records no vocabulary (a nanoGPT checkpoint?) and its model has {vocab_size} tokens, too few for "
        f"GPT-2 BPE, but {where}; pass --dataset=NAME_OR_FOLDER of the dataset (with its meta.pkl) it was trained on"
    )


def tokenizer_record(meta: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint stores so that it decodes without any dataset folder."""
    return {"tokenizer": "gpt2" if meta is None else "meta", "meta": meta}


def build_model(model_args: dict[str, Any], path: str | Path) -> GPT:
    """The (untrained) model a checkpoint's model_args describe; a UserError naming path if it cannot be built."""
    try:
        return GPT(GPTConfig(**model_args))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {path} describes a model this version cannot build: {e}") from None


def model_from_checkpoint(state: dict[str, Any], path: str | Path) -> GPT:
    """Rebuild the model a checkpoint describes and load its weights."""
    model = build_model(state["model_args"], path)
    load_weights(model, state["model"], path)
    return model


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    # Checkpoints from torch.compile'd models elsewhere carry an `_orig_mod.` prefix.
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"checkpoint {path} does not fit this architecture: {first[0].strip()}") from None


def load_optimizer(optimizer: Any, state: dict[str, Any], path: str | Path) -> None:
    """optimizer.load_state_dict, a mismatch (another optimizer, another model) as UserError."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {path} does not fit this run's optimizer: {e}") from None


def rng_state() -> dict[str, Any]:
    """Every random number generator training uses, as plain values (bytes, lists), so the
    state pickles anywhere, including across processes with all_gather_object."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run something that is not training (measuring, sampling, plotting, logging) without
    moving any random stream training draws from: the states are put back afterwards."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _byte_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _tuples(x: Any) -> Any:
    """random.setstate wants the nested tuples it gave, which a round trip may turn into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints we are about to write."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UserError(
            f"{folder} has {free / 2**20:.0f} MiB free but checkpoints need about {needed_bytes / 2**20:.0f} MiB; "
            "free some space or choose another --out_dir"
        )


# --- sharded (FSDP) checkpoints ----------------------------------------------------------------


def sharded_name(filename: str) -> str:
    """The folder a sharded save uses in place of a single file: ckpt.pt -> ckpt.dcp."""
    return Path(filename).stem + SHARDED_SUFFIX


def is_sharded(path: Path) -> bool:
    """Whether path is a complete sharded checkpoint folder (DCP metadata and our train state)."""
    return (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def _siblings(path: Path) -> tuple[Path, Path]:
    """(the temporary folder a save writes into, the folder the previous checkpoint moves aside to)."""
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def save_sharded(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], master: bool
) -> None:
    """Collective: every process writes its shards of model and optimizer into a temporary
    folder, rank 0 adds train_state and swaps the folder in for path."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, old = _siblings(path)
    if master and tmp.exists():
        shutil.rmtree(tmp)  # a save killed midway; DCP would mix its files with ours
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)  # returns once all shards are on disk
    if master:
        save_checkpoint(train_state, tmp / TRAIN_STATE)  # last: its presence marks the folder complete
        _swap_in(tmp, path, old)
    dist.barrier()  # nobody reads or writes path before the swap is done


def _swap_in(new: Path, path: Path, old: Path) -> None:
    """Replace the folder path by the folder new; a crash in between leaves both for recover_sharded."""
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one in one step
    os.replace(new, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_sharded(path: Path) -> None:
    """Complete or undo a save that was killed midway and remove its leftovers (rank 0, at startup)."""
    tmp, old = _siblings(path)
    if not path.exists():
        if is_sharded(tmp):  # killed between the two renames: the new checkpoint is complete
            os.replace(tmp, path)
        elif old.exists():
            os.replace(old, path)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def readable_sharded(path: Path) -> Path:
    """The complete checkpoint folder for path without changing anything on disk (training may
    be running): path itself, else what a save killed between its renames left."""
    tmp, old = _siblings(path)
    for candidate in (path, tmp, old):
        if is_sharded(candidate):
            return candidate
    if path.is_dir():
        raise UserError(f"{path} is not a complete sharded checkpoint (no .metadata or {TRAIN_STATE})")
    raise UserError(f"no sharded checkpoint at {path}")


def load_train_state(path: Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint: step, config, model_args, RNG states, ..."""
    return _read(path / TRAIN_STATE, ("model_args", "iter_num", "config"))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill model (and optimizer) from a sharded checkpoint, whatever the number of processes
    that wrote it: DCP reshards. Without a process group the model is simply unsharded."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict gives tensors of the right shapes and shards to read into; for an
    # optimizer that has not stepped yet it creates the (zero) state first.
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}
    try:
        with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: we mean to
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # a BaseException wrapping each rank's error: keys, shapes, files
        raise UserError(f"sharded checkpoint {path} cannot be loaded into this model: {_first_line(e)}") from None
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make renames inside folder durable
    finally:
        os.close(fd)


# --- consolidation: a sharded folder as one ordinary checkpoint file ------------------------------


def consolidate(cfg: Any) -> Path:
    """Write the single-file checkpoint for cfg's sharded folder (a ConsolidateConfig); return its path.
    The same file train.py writes without FSDP: it samples, exports and resumes with parallel=ddp."""
    from gptsmith.optim import build_optimizer

    source = readable_sharded(Path(cfg.out_dir) / cfg.ckpt)
    state = load_train_state(source)
    model = build_model(state["model_args"], source)
    # The optimizer train.py made, so the saved state maps onto the same parameter groups.
    optimizer = build_optimizer(model, state["config"], "cpu") if cfg.optimizer else None
    load_sharded(source, model, optimizer)
    out = {"model": model.state_dict()}
    if optimizer is not None:
        out["optimizer"] = optimizer.state_dict()
    out.update({k: v for k, v in state.items() if k != "world_size"})  # the rest is as train.py saved it
    dest = cfg.output_path()
    if not dest.parent.is_dir():
        raise UserError(f"cannot write {dest}: no folder {dest.parent}")
    save_checkpoint(out, dest)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {dest}: step {state['iter_num']}, {n_params / 1e6:.2f}M parameters"
        f"{', with optimizer state' if optimizer is not None else ''} "
        f"(from the shards of {state.get('world_size', '?')} processes)"
    )
    return dest


def consolidate_main(argv: list[str] | None = None) -> None:
    """python consolidate.py: a sharded (FSDP) checkpoint folder as one ckpt.pt, in one process, no GPU needed."""
    import sys

    from gptsmith.config import ConsolidateConfig
    from gptsmith.configurator import cli_errors, load_config

    with cli_errors():
        dest = consolidate(load_config(ConsolidateConfig, sys.argv[1:] if argv is None else argv))
        print(f"next: python sample.py --out_dir={dest.parent} --ckpt={dest.name}")
