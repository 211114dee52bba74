"""Token datasets on disk and the batches drawn from them.

A dataset is a folder data/<name>/ holding train.bin and val.bin (uint16 token ids, as
the prepare scripts write them) and, for non-GPT-2 vocabularies, meta.pkl (vocab_size,
stoi, itos). The batch of optimizer step t is a pure function of (seed, t), so a resumed
run or a run on more processes sees exactly the same data.

A dataset may instead be made of fixed-length examples and ship its own targets (e.g.
data/addition): meta.pkl then declares example_len = L (train.bin is a run of L-token
examples) and/or targets_dtype = 'int16' | 'int32', meaning every split has a
<split>.targets.bin beside <split>.bin, one target per token: targets[i] is what the model
should predict after token i, -1 = nothing (prompts, padding). Windows are then whole
examples (block_size = L with its own targets, L - 1 without) and y comes from the targets
file instead of the next tokens.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptsmith.configurator import UserError
from gptsmith.generated import GeneratedSplit

DATA_ROOT = Path("data")  # relative to the current directory, as in nanoGPT: run the commands from the clone
GPT2_BPE_TOKENS = 50257  # GPT-2's BPE vocabulary: the rows of OpenAI's embedding matrix
GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
EVAL_SEED = 20240101  # fixed, so val losses of runs with different seeds are comparable
FULL_SCAN_LIMIT = 1 << 28  # check every token id at startup for splits up to 256M tokens
TARGET_DTYPES = ("int16", "int32")  # <split>.targets.bin: signed, for -1 = no target


def dataset_dir(dataset: str) -> Path:
    """data/<dataset>/ under the current directory, or the folder itself when dataset is a path."""
    p = Path(dataset)
    if len(p.parts) > 1 or p.is_absolute():
        return p
    return DATA_ROOT / dataset


def prepare_hint(dataset: str) -> str:
    script = DATA_ROOT / dataset / "prepare.py"
    if script.is_file():
        return f"run: python data/{dataset}/prepare.py"
    return "prepare it first (see README: 'Training on your own text')"


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a class or function: loading it could run code."""


class PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain values only: dict, list, tuple, str, bytes, int, float, bool and None
    have opcodes of their own, while anything that could run code (an object, a function call)
    must name a global, which is refused (but set and frozenset, which older protocols name).
    nanoGPT's meta.pkl loads; a booby-trapped one does not."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        raise UnsafePickle(f"it names {module}.{name}, and loading it would run code")


def load_meta(folder: Path) -> dict[str, Any] | None:
    """meta.pkl of a dataset folder, checked; None when there is none (GPT-2 BPE)."""
    path = folder / "meta.pkl"
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            meta = PlainUnpickler(f).load()
    except UnsafePickle as e:
        raise UserError(
            f"{path} refused: {e}; a meta.pkl holds only plain values (re-run the dataset's "
            "prepare script, or ask where this one came from)"
        ) from None
    except Exception as e:  # truncated or garbage: pickle raises many types
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run the dataset's prepare script") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] <= 0:
        raise UserError(f"{path} has no valid vocab_size; re-run the dataset's prepare script")
    example_len = meta.get("example_len")
    if example_len is not None and (not isinstance(example_len, int) or example_len < 2):
        raise UserError(f"{path} has example_len={example_len!r}; it must be an int of at least 2 (tokens per example)")
    if meta.get("targets_dtype") not in (None, *TARGET_DTYPES):
        raise UserError(
            f"{path} has targets_dtype={meta['targets_dtype']!r}; it must be one of {', '.join(TARGET_DTYPES)}"
        )
    return meta


def example_length(meta: dict[str, Any] | None, block_size: int, dataset: str) -> int:
    """0 for a plain token stream; else the length of the dataset's examples, which block_size must fit."""
    length = (meta or {}).get("example_len") or 0
    if not length:
        return 0
    if meta.get("targets_dtype"):
        wanted, how = length, "it has its own targets, so a window is one whole example"
    else:  # x and y are the example shifted by one
        wanted, how = length - 1, "a window is one example but its last token, which is only a target"
    if block_size != wanted:
        raise UserError(
            f"dataset '{dataset}' is made of {length}-token examples (meta.pkl example_len) and {how}: "
            f"set --block_size={wanted} (got {block_size})"
        )
    return length


@dataclass(frozen=True)
class TargetedTokens:
    """A split with its own targets: targets[i] is the token to predict after tokens[i], -1 = none."""

    tokens: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def check_same_vocab(
    source: dict[str, Any] | None, data: dict[str, Any] | None, source_name: str, dataset: str
) -> None:
    """Refuse a dataset whose token ids mean other things than they did to the model trained on source's vocabulary."""
    if source is None and data is None:
        return  # both GPT-2 BPE
    if source is not None and data is not None:
        if source["vocab_size"] == data["vocab_size"] and source.get("stoi") == data.get("stoi"):
            return
        if source["vocab_size"] == data["vocab_size"]:
            raise UserError(
                f"dataset '{dataset}' and {source_name} both have {data['vocab_size']} tokens, but not the same "
                "characters for them; prepare the dataset with the checkpoint's vocabulary"
            )
    raise UserError(
        f"dataset '{dataset}' has {_vocab_name(data)}, but {source_name} was trained on {_vocab_name(source)}; "
        "the token ids would mean other things: prepare the dataset with the checkpoint's vocabulary"
    )


def _vocab_name(meta: dict[str, Any] | None) -> str:
    return (
        "GPT-2 BPE tokens (no meta.pkl)" if meta is None else f"its own vocabulary of {meta['vocab_size']} (meta.pkl)"
    )


def open_split(
    folder: Path, split: str, dataset: str, vocab_size: int, meta: dict[str, Any] | None = None
) -> np.memmap | TargetedTokens:
    """A split's tokens as a read-only memmap, after checking the file is usable; with its
    targets file too when meta declares targets_dtype."""
    path = folder / f"{split}.bin"
    data = _open_checked(path, np.dtype(np.uint16), dataset, "uint16 tokens")
    if len(data) <= FULL_SCAN_LIMIT:
        check_token_ids(data, vocab_size, str(path))
    example_len = (meta or {}).get("example_len")
    if example_len and len(data) % example_len:
        raise UserError(
            f"{path} holds {len(data)} tokens, not a whole number of {example_len}-token examples (meta.pkl "
            f"example_len; truncated?); {prepare_hint(dataset)}"
        )
    if not (meta or {}).get("targets_dtype"):
        return data
    return TargetedTokens(data, open_targets(folder, split, dataset, vocab_size, meta, len(data)))


def open_targets(
    folder: Path, split: str, dataset: str, vocab_size: int, meta: dict[str, Any], n_tokens: int
) -> np.memmap:
    """<split>.targets.bin as a read-only memmap, checked: one target per token, each -1 or a token id."""
    path = folder / f"{split}.targets.bin"
    dtype = np.dtype(meta["targets_dtype"])
    if not path.exists():
        raise UserError(
            f"dataset '{dataset}' declares its own targets (meta.pkl targets_dtype) but has no {path}; "
            f"{prepare_hint(dataset)}"
        )
    targets = _open_checked(path, dtype, dataset, f"{dtype.name} targets")
    if len(targets) != n_tokens:
        raise UserError(
            f"{path} holds {len(targets)} targets but {split}.bin holds {n_tokens} tokens; they must match one to one "
            f"(truncated?); {prepare_hint(dataset)}"
        )
    if len(targets) <= FULL_SCAN_LIMIT:
        bad = (targets < -1) | (targets >= vocab_size)
        if bad.any():
            raise UserError(f"{path} holds target {int(targets[bad][0])}; targets must be -1 or below {vocab_size}")
        if (targets == -1).all():
            raise UserError(f"{path} has no target to learn (every one is -1); {prepare_hint(dataset)}")
    return targets


def _open_checked(path: Path, dtype: np.dtype, dataset: str, what: str) -> np.memmap:
    """A memmap of path, after checking the file exists, is not empty and holds whole items."""
    if not path.exists():
        raise UserError(f"dataset '{dataset}' has no {path}; {prepare_hint(dataset)}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty; {prepare_hint(dataset)}")
    if size % dtype.itemsize:
        odd = "an odd number of" if dtype.itemsize == 2 else f"{size} (not a multiple of {dtype.itemsize})"
        raise UserError(f"{path} has {odd} bytes, so it is not {what} (truncated?); {prepare_hint(dataset)}")
    return np.memmap(path, dtype=dtype, mode="r")


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
    With example_len > 0 the windows are whole examples: they start at multiples of it.
    """

    n_tokens: int
    block_size: int
    batch_size: int
    micro_steps: int  # gradient_accumulation_steps summed over every process
    seed: int
    mode: str = "random"
    example_len: int = 0  # 0: windows start anywhere (a token stream)
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def offsets(self, step: int, micro_step: int) -> np.ndarray:
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            if self.example_len:  # a random example index each, scaled to its first token
                index = rng.integers(0, self.n_tokens // self.example_len, size=(self.micro_steps, self.batch_size))
                return index[micro_step] * self.example_len
            starts = rng.integers(0, self.n_tokens - self.block_size, size=(self.micro_steps, self.batch_size))
            return starts[micro_step]
        stride = self.example_len or self.block_size
        n_windows = self.n_tokens // stride if self.example_len else (self.n_tokens - 1) // self.block_size
        first = (step * self.micro_steps + micro_step) * self.batch_size
        index = np.arange(first, first + self.batch_size)
        epochs, slots = np.divmod(index, n_windows)
        return np.array([self._perm(int(e), n_windows)[s] for e, s in zip(epochs, slots)]) * stride

    def _perm(self, epoch: int, n_windows: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(n_windows)}
        return self._perms[epoch]


def eval_offsets(n_tokens: int, block_size: int, batch_size: int, eval_iters: int, example_len: int = 0) -> np.ndarray:
    """Fixed evaluation windows, (n_batches, batch_size): eval_iters random batches drawn
    with a constant seed, or with eval_iters=0 the whole split in consecutive windows.
    With example_len > 0 the windows are whole examples: distinct ones (a fixed shuffle)
    while the split has enough, or with eval_iters=0 every example once."""
    if example_len:
        n_examples = n_tokens // example_len
        if eval_iters > 0:
            order = np.random.default_rng(EVAL_SEED).permutation(n_examples)
            return np.resize(order, (eval_iters, batch_size)) * example_len  # np.resize repeats a short split
        starts = np.arange(n_examples) * example_len
        pad = (-len(starts)) % batch_size
        return np.concatenate([starts, np.full(pad, -1)]).reshape(-1, batch_size)
    if eval_iters > 0:
        rng = np.random.default_rng(EVAL_SEED)
        return rng.integers(0, n_tokens - block_size, size=(eval_iters, batch_size))
    starts = np.arange(0, n_tokens - block_size, block_size)
    pad = (-len(starts)) % batch_size  # the last batch repeats its first windows; weights below ignore them
    return np.concatenate([starts, np.full(pad, -1)]).reshape(-1, batch_size)


def get_batch(
    data: np.ndarray | TargetedTokens | GeneratedSplit, offsets: np.ndarray, block_size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, each (B, T), for windows starting at offsets: y is the next
    tokens, or for a split with its own targets the targets of x's tokens; for a generated
    split the offsets are the rows' keys (gptsmith.generated).
    An offset of -1 (padding of the last eval batch) yields targets of -1, ignored by the loss.

    The windows are gathered into one contiguous host tensor, (B, T+1) or for own targets
    (2, B, T), pinned on CUDA so that one non-blocking copy moves it while the GPU keeps
    working; x and y are slices of the device copy (x a view: the embedding takes it as is)."""
    pad = offsets < 0
    starts = np.clip(offsets, 0, None)[:, None]
    if isinstance(data, GeneratedSplit):  # offsets are the rows' keys
        host = torch.from_numpy(data.rows(offsets))  # (2, B, T)
    elif isinstance(data, TargetedTokens):
        window = starts + np.arange(block_size)  # (B, T)
        host = torch.from_numpy(np.stack([data.tokens[window], data.targets[window]]).astype(np.int64))  # (2, B, T)
    else:
        host = torch.from_numpy(data[starts + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    batch = to_device(host, device)
    x, y = (batch[0], batch[1]) if isinstance(data, (TargetedTokens, GeneratedSplit)) else (batch[:, :-1], batch[:, 1:])
    if pad.any():  # only the last batch of a whole-split evaluation: a small extra copy is fine
        y = y.masked_fill(torch.from_numpy(pad[:, None]).to(device), -1)
    return x, y


def to_device(host: torch.Tensor, device: str) -> torch.Tensor:
    """A batch gathered on the host, on the device: pinned and copied without waiting on CUDA."""
    if device.startswith("cuda"):
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


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
