"""Datasets generated on the fly: a dataset folder holding generate.py instead of train.bin/val.bin.

    data/<name>/generate.py
        meta = {"vocab_size": V, "stoi": {...}, "itos": {...}}  # the vocabulary, as a meta.pkl holds it
        block_size = L                                          # tokens per example (the model's block_size)
        def example(rng: numpy.random.Generator) -> tuple[list[int], list[int]]:
            '''One example: its tokens and, for each, the token to predict after it (-1: nothing).'''
        val_share = 0.05                                        # optional: the share of problems held out
        def problem(tokens, targets) -> bytes | str: ...       # optional: what identifies a problem

Training never reads files: the batch of (seed, step, micro-step) is a key per row drawn from
(seed, step) exactly as windows of a token file are (data.BatchSampler), and each row is
example(numpy.random.default_rng(key)), padded to block_size with token 0 and target -1. So a
resumed run, or one on more or fewer processes, trains on exactly the same examples.

Held out by construction, not by luck: a problem (by default the prompt, the tokens up to the
first one with a target) is in the val split when a hash of it falls in the first val_share
of the hash range, and every draw of a split takes the generator's next example until one of
that split comes: no val problem can ever be trained on, whatever the seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gptsmith.configurator import UserError

GENERATOR = "generate.py"
KEY_RANGE = 2**62  # row keys are drawn below this
MAX_TRIES = 10_000  # draws of one example before a split is called empty
VAL_SHARE = 0.05  # the share of problems held out where generate.py sets no val_share


def generator_path(folder: Path) -> Path | None:
    """The folder's generate.py when the dataset is generated (it has no train.bin), else None."""
    path = folder / GENERATOR
    return path if path.is_file() and not (folder / "train.bin").exists() else None


def load_generator(path: Path, dataset: str) -> ModuleType:
    """Import a dataset's generate.py and check what it must define, with one error line if it does not."""
    spec = importlib.util.spec_from_file_location(f"gptsmith_generator_{dataset.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error, reported in one line
        raise UserError(f"{path} failed to load: {type(e).__name__}: {e}") from None
    meta = getattr(module, "meta", None)
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] <= 0:
        raise UserError(f"{path} must define meta = {{'vocab_size': ..., 'stoi': ..., 'itos': ...}}")
    if not isinstance(getattr(module, "block_size", None), int) or module.block_size < 1:
        raise UserError(f"{path} must define block_size, the tokens per example (an int)")
    if not callable(getattr(module, "example", None)):
        raise UserError(f"{path} must define example(rng) -> (tokens, targets)")
    share = getattr(module, "val_share", VAL_SHARE)
    if not 0 < share < 1:
        raise UserError(f"{path}: val_share must be between 0 and 1, got {share}")
    return module


def prompt(tokens: list[int], targets: list[int]) -> bytes:
    """The default identity of a problem: its tokens up to the first one that has a target."""
    first = next((i for i, t in enumerate(targets) if t != -1), len(targets) - 1)
    return prompt_key(tokens[: first + 1])


def prompt_key(prompt_tokens: list[int]) -> bytes:
    """What prompt() identifies a problem by, from its prompt's tokens: for a script that draws
    problems itself (an evaluation) and must know which of them are held out."""
    return np.asarray(prompt_tokens, dtype=np.int64).tobytes()


def is_held_out(key: bytes | str, val_share: float) -> bool:
    """Whether a problem belongs to the val split: a fixed hash, the same on every machine and run."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") < val_share * 2**64


@dataclass(frozen=True)
class GeneratedSplit:
    """One split of a generated dataset: rows made from keys, as TargetedTokens are cut from files."""

    module: ModuleType
    split: str  # 'train' or 'val'
    path: Path

    def __len__(self) -> int:  # unbounded: examples never run out
        return KEY_RANGE

    @property
    def meta(self) -> dict[str, Any]:
        return {**self.module.meta, "example_len": self.module.block_size, "targets_dtype": "int32"}

    def example(self, key: int) -> tuple[list[int], list[int]]:
        """The example of this split that the key stands for: the generator's first of this split."""
        rng = np.random.default_rng(int(key))
        module, val = self.module, self.split == "val"
        identify = getattr(module, "problem", prompt)
        share = getattr(module, "val_share", VAL_SHARE)
        for _ in range(MAX_TRIES):
            tokens, targets = module.example(rng)
            if is_held_out(identify(tokens, targets), share) == val:
                return self._checked(list(tokens), list(targets))
        raise UserError(f"{self.path} made no {self.split} example in {MAX_TRIES} draws; check val_share and problem()")

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """(2, B, block_size) int64: each key's tokens (padded with 0) and targets (padded with -1)."""
        return padded([self.example(key) for key in keys], self.module.block_size)

    def _checked(self, tokens: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
        vocab, length = self.module.meta["vocab_size"], self.module.block_size
        if len(tokens) != len(targets) or not 0 < len(tokens) <= length:
            raise UserError(
                f"{self.path}: example() gave {len(tokens)} tokens and {len(targets)} targets; they must be "
                f"as many, between 1 and block_size ({length})"
            )
        ids, wanted = np.asarray(tokens), np.asarray(targets)
        if ids.min() < 0 or ids.max() >= vocab or wanted.min() < -1 or wanted.max() >= vocab:
            raise UserError(f"{self.path}: example() gave a token or target outside 0..{vocab - 1} (targets: or -1)")
        if wanted.max() == -1:  # a micro-batch of such examples would have no loss to average
            raise UserError(f"{self.path}: example() gave an example with no target (every target -1)")
        return tokens, targets


def padded(examples: list[tuple[list[int], list[int]]], length: int) -> np.ndarray:
    """(2, B, length) int64: the examples' tokens (padded with 0) and targets (padded with -1)."""
    out = np.zeros((2, len(examples), length), dtype=np.int64)
    out[1] = -1
    for row, (tokens, targets) in enumerate(examples):
        out[0, row, : len(tokens)] = tokens
        out[1, row, : len(targets)] = targets
    return out


class SortedSteps:
    """The training micro-batches of a generated dataset, one step at a time, sorted by length.

    Examples differ in length (a calculator's sum is 17 tokens, its division 110), and a batch
    padded to its longest row spends much of its work on padding. So all the rows of a step
    (every rank's and every micro-step's: the keys the sampler draws for them) are sorted,
    longest first, and cut into the step's micro-batches, each padded only to its own longest
    row (to block_size when trim is False: a compiled model would recompile at every new length).
    With gradient_accumulation_steps=4 the short examples then share micro-batches of short rows.
    Which micro-batch a row lands in does not change what is learned: the trainer weighs each
    micro-batch's mean loss by its share of the step's targets, so a step's loss is the mean over
    all its targets, as one batch of all its rows would give."""

    def __init__(self, split: GeneratedSplit, sampler: Any, trim: bool) -> None:
        self.split, self.sampler, self.trim = split, sampler, trim
        self.step: int | None = None
        self.batches: list[np.ndarray] = []
        self.counts: list[int] = []
        self.computed = self.full = 0  # token positions run through the model, and without the trimming

    def micro_batch(self, step: int, index: int) -> tuple[np.ndarray, float]:
        """Micro-batch index (counted over all ranks) of the step: (2, B, L) tokens and targets, and
        its share of the step's targets."""
        if step != self.step:
            self._build(step)
        return self.batches[index], self.counts[index] / sum(self.counts)

    def _build(self, step: int) -> None:
        micro_steps, block_size = self.sampler.micro_steps, self.split.module.block_size
        keys = np.stack([self.sampler.offsets(step, m) for m in range(micro_steps)])  # (M, B)
        examples = [self.split.example(key) for key in keys.ravel()]
        order = np.argsort([-len(tokens) for tokens, _ in examples], kind="stable")  # longest first
        rows = keys.shape[1]
        chunks = [[examples[i] for i in order[m * rows : (m + 1) * rows]] for m in range(micro_steps)]
        self.batches = [padded(c, len(c[0][0]) if self.trim else block_size) for c in chunks]
        self.counts = [int((b[1] != -1).sum()) for b in self.batches]
        self.step = step
        self.computed += sum(b[0].size for b in self.batches)
        self.full += micro_steps * rows * block_size

    def share_computed(self) -> float:
        """The share of the full-length token positions left to compute after trimming, so far:
        MFU counts only these."""
        return self.computed / self.full if self.full else 1.0


def eval_keys(eval_iters: int, batch_size: int, seed: int) -> np.ndarray:
    """Fixed keys of the evaluation batches, (eval_iters, batch_size): the same at every evaluation."""
    return np.random.default_rng(seed).integers(0, KEY_RANGE, size=(eval_iters, batch_size))
