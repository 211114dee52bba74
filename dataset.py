"""Token datasets on disk and the batches drawn from them.

A dataset is a folder data/<name>/ holding train.bin and val.bin (uint16 token ids, as
the prepare scripts write them) and, for non-GPT-2 vocabularies, meta.pkl (vocab_size,
stoi, itos). The batch of optimizer step t is a pure function of (seed, t), so a resumed
run or a run on more processes sees exactly the same data.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configurator import UserError

DATA_ROOT = Path(__file__).resolve().parent / "data"
GPT2_BPE_TOKENS = 50257  # GPT-2's BPE vocabulary: the rows of OpenAI's embedding matrix
GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
EVAL_SEED = 20240101  # fixed, so val losses of runs with different seeds are comparable
FULL_SCAN_LIMIT = 1 << 28  # check every token id at startup for splits up to 256M tokens


def dataset_dir(dataset: str) -> Path:
    """data/<dataset>/ beside this file, or the folder itself when dataset is a path."""
    p = Path(dataset)
    if len(p.parts) > 1 or p.is_absolute():
        return p
    return DATA_ROOT / dataset


def prepare_hint(dataset: str) -> str:
    script = DATA_ROOT / dataset / "prepare.py"
    if script.is_file():
        return f"run: python data/{dataset}/prepare.py"
    return "prepare it first (see README: 'Training on your own text')"


def load_meta(folder: Path) -> dict[str, Any] | None:
    """meta.pkl of a dataset folder, checked; None when there is none (GPT-2 BPE)."""
    path = folder / "meta.pkl"
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except Exception as e:  # truncated or garbage: pickle raises many types
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run the dataset's prepare script") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] <= 0:
        raise UserError(f"{path} has no valid vocab_size; re-run the dataset's prepare script")
    return meta


def open_split(folder: Path, split: str, dataset: str, vocab_size: int) -> np.memmap:
    """A split's tokens as a read-only memmap, after checking the file is usable."""
    path = folder / f"{split}.bin"
    if not path.exists():
        raise UserError(f"dataset '{dataset}' has no {path}; {prepare_hint(dataset)}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty; {prepare_hint(dataset)}")
    if size % 2:
        raise UserError(
            f"{path} has an odd number of bytes, so it is not uint16 tokens (truncated?); {prepare_hint(dataset)}"
        )
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) <= FULL_SCAN_LIMIT:
        check_token_ids(data, vocab_size, str(path))
    return data


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise UserError(
            f"{where} holds token id {top} but vocab_size is {vocab_size}; the data and its meta.pkl disagree"
        )


@dataclass
class BatchSampler:
    """Start offsets of training windows; the batch of (step, micro_step) depends only on
    (seed, step, micro_step), never on how many processes share the work.

    mode 'random' draws windows anywhere with replacement (nanoGPT's way); 'epoch' cuts
    the split into non-overlapping windows and visits each once per epoch, reshuffled.
    """

    n_tokens: int
    block_size: int
    batch_size: int
    micro_steps: int  # gradient_accumulation_steps summed over every process
    seed: int
    mode: str = "random"
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def offsets(self, step: int, micro_step: int) -> np.ndarray:
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            starts = rng.integers(0, self.n_tokens - self.block_size, size=(self.micro_steps, self.batch_size))
            return starts[micro_step]
        n_windows = (self.n_tokens - 1) // self.block_size
        first = (step * self.micro_steps + micro_step) * self.batch_size
        index = np.arange(first, first + self.batch_size)
        epochs, slots = np.divmod(index, n_windows)
        return np.array([self._perm(int(e), n_windows)[s] for e, s in zip(epochs, slots)]) * self.block_size

    def _perm(self, epoch: int, n_windows: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(n_windows)}
        return self._perms[epoch]


def eval_offsets(n_tokens: int, block_size: int, batch_size: int, eval_iters: int) -> np.ndarray:
    """Fixed evaluation windows, (n_batches, batch_size): eval_iters random batches drawn
    with a constant seed, or with eval_iters=0 the whole split in consecutive windows."""
    if eval_iters > 0:
        rng = np.random.default_rng(EVAL_SEED)
        return rng.integers(0, n_tokens - block_size, size=(eval_iters, batch_size))
    starts = np.arange(0, n_tokens - block_size, block_size)
    pad = (-len(starts)) % batch_size  # the last batch repeats its first windows; weights below ignore them
    return np.concatenate([starts, np.full(pad, -1)]).reshape(-1, batch_size)


def get_batch(data: np.ndarray, offsets: np.ndarray, block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y, each (B, T), for windows starting at offsets.
    An offset of -1 (padding of the last eval batch) yields targets of -1, ignored by the loss."""
    pad = offsets < 0
    window = np.clip(offsets, 0, None)[:, None] + np.arange(block_size + 1)  # (B, T+1)
    chunk = torch.from_numpy(data[window].astype(np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:].clone()
    if pad.any():
        y[torch.from_numpy(pad)] = -1
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_tokenizer(meta: dict[str, Any] | None) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) for a dataset: its meta.pkl's characters, else GPT-2 BPE via tiktoken."""
    if meta is not None and "stoi" in meta:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(text: str) -> list[int]:
            unknown = sorted({c for c in text if c not in stoi})
            if unknown:
                raise UserError(f"the prompt has characters outside the model's vocabulary: {''.join(unknown)!r}")
            return [stoi[c] for c in text]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    enc = gpt2_encoding()
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode


def gpt2_encoding() -> Any:
    """tiktoken's GPT-2 BPE; offline it needs TIKTOKEN_CACHE_DIR pointing at its cached files."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors surface as requests/urllib exceptions of many kinds
        raise UserError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}): offline, set TIKTOKEN_CACHE_DIR to a folder "
            "holding tiktoken's cached GPT-2 files (e.g. ../shared/tiktoken_cache)"
        ) from None
