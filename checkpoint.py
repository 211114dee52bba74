"""Saving and loading checkpoints so that a crash at any moment leaves a loadable file.

A checkpoint is written to a temporary file beside its target, flushed to disk, then
renamed over the target in one atomic step: readers see the old file or the new one,
never half of one. Only plain Python values and tensors go in, so loading uses
torch.load(weights_only=True) and never runs code from the file. Pretrained GPT-2 weights
(init_from=gpt2 or a Hugging Face folder) load through here too, failures as UserError.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configurator import UserError
from model import GPT, GPT2_NAMES, GPTConfig

REQUIRED_KEYS = ("model", "model_args", "iter_num", "config")


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
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, foreign pickle: many exception types
        raise UserError(
            f"checkpoint {path} is unreadable (truncated or not a checkpoint): {type(e).__name__}"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"checkpoint {path} is not a gptsmith checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path) -> GPT:
    """Rebuild the model a checkpoint describes and load its weights."""
    try:
        model = GPT(GPTConfig(**state["model_args"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {path} describes a model this version cannot build: {e}") from None
    load_weights(model, state["model"], path)
    return model


def is_pretrained(init_from: str) -> bool:
    """Whether init_from names pretrained weights: a GPT-2 hub name or an existing local folder."""
    return init_from in GPT2_NAMES or Path(init_from).is_dir()


def check_init_from(init_from: str, modes: tuple[str, ...]) -> None:
    """Accept one of modes (e.g. 'scratch', 'resume') or pretrained weights; otherwise a UserError naming the options."""
    if init_from not in modes and not is_pretrained(init_from):
        options = ", ".join(f"'{m}'" for m in (*modes, *GPT2_NAMES))
        raise UserError(
            f"init_from must be {options} or the path of a Hugging Face model folder, got {init_from!r} (no such folder)"
        )


def load_pretrained(init_from: str, dropout: float = 0.0) -> GPT:
    """GPT.from_pretrained, with its failures as UserError."""
    try:
        return GPT.from_pretrained(init_from, {"dropout": dropout})
    except (ImportError, ValueError) as e:
        raise UserError(str(e)) from None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    # Checkpoints from torch.compile'd models elsewhere carry an `_orig_mod.` prefix.
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"checkpoint {path} does not fit this architecture: {first[0].strip()}") from None


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
