"""What several test files share: paths, loading scripts, test data made on the spot, run outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import string
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# tiny Shakespeare's 65 characters; the made-up text below uses exactly these, so it prepares alike.
CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase


# The tests' tiny run (conftest.tiny_cfg): a model that trains in a second or two on a CPU. Everything
# not here is the default; why each is pinned: conftest.tiny_cfg.
TINY = dict(device="cpu", compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
            gradient_accumulation_steps=1, learning_rate=3e-3, min_lr=3e-4, max_iters=20, lr_decay_iters=20,
            warmup_iters=4, eval_interval=10, eval_iters=4, plot=False)  # fmt: skip


def load_script(relpath: str) -> ModuleType:
    """Import a script that lives outside a package, e.g. data/<name>/prepare.py."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_play(n_chars: int = 400_000, seed: int = 0) -> str:
    """A made-up play in tiny Shakespeare's 65 characters: speakers, then lines of words drawn
    from a fixed lexicon with Zipf-like frequencies, so a small model has something to learn."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    lexicon = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    weights = [1 / (rank + 1) for rank in range(len(lexicon))]
    speakers = ["".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 9))) for _ in range(12)]
    parts = ["$&3"]  # the rare characters, once each, so the vocabulary is all 65
    size = 3
    while size < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = rng.choices(lexicon, weights, k=rng.randint(3, 10))
            words[0] = words[0].capitalize()
            line = " ".join(words)
            line = line.replace(" ", rng.choice([" ", ", ", " ", "; ", " - ", " "]), 1)
            lines.append(line + rng.choice(".,;:!?'") + "\n")
        block = f"{rng.choice(speakers)}:\n{''.join(lines)}\n"
        parts.append(block)
        size += len(block)
    text = "".join(parts)[:n_chars]
    assert set(text) == set(CHARS), sorted(set(CHARS) - set(text))
    return text


def missing_shared(what: str) -> None:
    """Skip the test for want of a shared asset, or fail under .ci/run, where all must run."""
    if os.environ.get("GPTSMITH_REQUIRE_SHARED"):
        pytest.fail(f"{what} (GPTSMITH_REQUIRE_SHARED is set: every test must run)")
    pytest.skip(what)


def read_metrics(out_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(log records, eval records) from metrics.jsonl."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def nan_after(monkeypatch, calls: int) -> None:
    """Make the training loss NaN after `calls` training forward passes."""
    import torch

    from gptsmith import model as model_module

    real = model_module.masked_cross_entropy
    count = {"n": 0}

    def poisoned(logits, targets):
        loss = real(logits, targets)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        count["n"] += 1
        return loss * float("nan") if count["n"] > calls else loss

    monkeypatch.setattr(model_module, "masked_cross_entropy", poisoned)
