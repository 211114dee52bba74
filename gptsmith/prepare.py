"""What every data/<name>/prepare.py shares: finding the input text, encoding it, writing splits safely."""

from __future__ import annotations

import codecs
import contextlib
import glob
import os
import pickle
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from gptsmith.configurator import UserError, cli_errors, load_config, opt

UINT16_LIMIT = 2**16


@dataclass
class PrepareConfig:
    """Options of the prepare scripts."""

    input: str = opt("", "a local copy of the input text (else input.txt beside the script, else a download)")
    out_dir: str = opt("", "where train.bin, val.bin and meta.pkl go (default: the script's folder)")


def read_input_text(input_path: str | None, local_copy: Path, url: str) -> str:
    """The text from --input, else the local copy, else downloaded (and kept as the local copy)."""
    if input_path:
        return read_text_file(Path(input_path))
    if local_copy.exists():
        return read_text_file(local_copy)
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


def read_text_file(path: Path) -> str:
    """A file's text, checked: it exists, is readable, valid UTF-8 and not empty."""
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


def expand_inputs(pattern: str) -> list[Path]:
    """The files a path or glob names (** spans folders), sorted; each must exist and be non-empty."""
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise UserError(f"no files match {pattern}")
    else:
        path = Path(pattern)
        if path.is_dir():
            raise UserError(f"{path} is a folder; name its files with a glob, e.g. '{path / '*.txt'}'")
        if not path.is_file():
            raise UserError(f"input file {path} not found")
        paths = [path]
    for path in paths:
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty")
    return paths


def check_utf8(path: Path, block: int = 1 << 24) -> None:
    """Fail with the file and byte offset when a file is not valid UTF-8, reading it in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(block):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} is not valid UTF-8 text (byte {offset + e.start})") from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a multi-byte character
        raise UserError(f"{path} is not valid UTF-8 text (it ends mid-character)") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def gpt2() -> Any:
    """tiktoken's GPT-2 BPE, or a UserError saying how to get it offline."""
    from gptsmith.data import gpt2_encoding  # here, not at the top: dataset imports torch, which char data never needs

    return gpt2_encoding()


def encode_documents(batch: dict[str, list], text_field: str) -> dict[str, list]:
    """GPT-2 tokens of each document, ended by <|endoftext|>: a batched function for datasets' map."""
    enc = gpt2()  # cached by tiktoken, and looked up here so worker processes need not pickle it
    eot = enc.eot_token
    # a missing text (null) counts as an empty document rather than failing a worker process mid-run
    return {"ids": [np.array([*enc.encode_ordinary(t or ""), eot], dtype=np.uint16) for t in batch[text_field]]}


class TokenWriter:
    """<split>.bin files filled chunk by chunk under temporary names; commit() publishes them all
    at once, and leaving the with-block without commit() (an error, Ctrl-C) deletes them."""

    def __init__(self, out_dir: Path, splits: Sequence[str] = ("train", "val")) -> None:
        self.out_dir = out_dir
        self.counts = dict.fromkeys(splits, 0)
        self._files: dict[str, Any] = {}

    def _tmp(self, name: str) -> Path:
        return self.out_dir / f".{name}.tmp"  # hidden, so a half-written file never looks like a dataset

    def __enter__(self) -> TokenWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for split in self.counts:
            self._files[split] = open(self._tmp(f"{split}.bin"), "wb")
        return self

    def write(self, split: str, ids: np.ndarray | Sequence[int]) -> None:
        """Append token ids to a split."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.dtype != np.uint16:
            if arr.min() < 0 or arr.max() >= UINT16_LIMIT:
                raise UserError(f"token id {arr.max()} does not fit uint16")
            arr = arr.astype(np.uint16)
        try:
            self._files[split].write(arr.tobytes())
        except OSError as e:  # a full disk, a quota: the user can fix it
            raise UserError(f"cannot write {self.out_dir / (split + '.bin')}: {e.strerror}") from None
        self.counts[split] += arr.size

    def commit(self, meta: dict[str, Any] | None = None) -> dict[str, int]:
        """Publish <split>.bin and meta.pkl (or drop a stale meta.pkl: GPT-2 data has none); return token counts."""
        for split, n in self.counts.items():
            if n == 0:
                raise UserError(f"the {split} split would be empty; the input is too short")
        try:
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        except OSError as e:
            raise UserError(f"cannot write to {self.out_dir}: {e.strerror}") from None
        meta_path = self.out_dir / "meta.pkl"
        if meta is not None:
            _write_durably(self._tmp("meta.pkl"), pickle.dumps(meta))
        for split in self.counts:
            os.replace(self._tmp(f"{split}.bin"), self.out_dir / f"{split}.bin")
        if meta is not None:
            os.replace(self._tmp("meta.pkl"), meta_path)
        elif meta_path.exists():
            meta_path.unlink()  # else the loader would read these GPT-2 ids with an old character vocabulary
            print(f"removed {meta_path}, left from an earlier dataset with its own vocabulary")
        self._files.clear()
        for split, n in self.counts.items():
            print(f"{split}: {n:,} tokens -> {self.out_dir / (split + '.bin')}")
        return dict(self.counts)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for split, f in self._files.items():  # empty after commit()
            with contextlib.suppress(OSError):  # a full disk fails the close too; the file goes anyway
                f.close()
            self._tmp(f"{split}.bin").unlink(missing_ok=True)
        self._tmp("meta.pkl").unlink(missing_ok=True)


def _write_durably(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def write_splits(out_dir: Path, splits: dict[str, Sequence[int]], meta: dict[str, Any] | None) -> dict[str, int]:
    """Write <split>.bin (uint16) and meta.pkl; each file appears complete or not at all."""
    arrays = {}
    for split, ids in splits.items():  # check everything before creating out_dir
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr) == 0:
            raise UserError(f"the {split} split would be empty; the input is too short")
        if arr.max() >= UINT16_LIMIT:
            raise UserError(f"token id {arr.max()} does not fit uint16")
        arrays[split] = arr.astype(np.uint16)
    with TokenWriter(out_dir, list(arrays)) as writer:
        for split, arr in arrays.items():
            writer.write(split, arr)
        return writer.commit(meta)


def run_prepare(
    prepare: Callable[[str | None, Path], dict[str, int]], script_dir: Path, argv: list[str] | None
) -> None:
    """The main() of a prepare script: options, errors as one line, exit code 2."""
    with cli_errors():
        cfg = load_config(PrepareConfig, argv)
        prepare(cfg.input or None, Path(cfg.out_dir) if cfg.out_dir else script_dir)
