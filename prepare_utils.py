"""What every data/<name>/prepare.py shares: finding the input text, writing splits safely."""

from __future__ import annotations

import os
import pickle
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configurator import UserError, cli_errors, load_config, opt


@dataclass
class PrepareConfig:
    """Options of the prepare scripts."""

    input: str = opt("", "a local copy of the input text (else input.txt beside the script, else a download)")
    out_dir: str = opt("", "where train.bin, val.bin and meta.pkl go (default: the script's folder)")


def read_input_text(input_path: str | None, local_copy: Path, url: str) -> str:
    """The text from --input, else the local copy, else downloaded (and kept as the local copy)."""
    if input_path:
        return _read_text(Path(input_path))
    if local_copy.exists():
        return _read_text(local_copy)
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); pass --input=PATH to a local copy of the text") from None
    text = _decode(data, url)
    tmp = local_copy.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, local_copy)
    return text


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"input file {path} not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return _decode(data, str(path))


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (byte {e.start})") from None
    if not text:
        raise UserError(f"{where} is empty")
    return text


def write_splits(out_dir: Path, splits: dict[str, Sequence[int]], meta: dict[str, Any] | None) -> dict[str, int]:
    """Write <split>.bin (uint16) and meta.pkl; each file appears complete or not at all."""
    arrays = {}
    for split, ids in splits.items():
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr) == 0:
            raise UserError(f"the {split} split would be empty; the input is too short")
        if arr.max() >= 2**16:
            raise UserError(f"token id {arr.max()} does not fit uint16")
        arrays[split] = arr.astype(np.uint16)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {f"{split}.bin": arr.tobytes() for split, arr in arrays.items()}
    if meta is not None:
        files["meta.pkl"] = pickle.dumps(meta)
    for name, blob in files.items():
        tmp = out_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)
    for split, arr in arrays.items():
        print(f"{split}: {len(arr):,} tokens -> {out_dir / (split + '.bin')}")
    return {split: len(arr) for split, arr in arrays.items()}


def run_prepare(
    prepare: Callable[[str | None, Path], dict[str, int]], script_dir: Path, argv: list[str] | None
) -> None:
    """The main() of a prepare script: options, errors as one line, exit code 2."""
    with cli_errors():
        cfg = load_config(PrepareConfig, argv)
        prepare(cfg.input or None, Path(cfg.out_dir) if cfg.out_dir else script_dir)
