"""Score a model trained on data/addition: greedy answers to every held-out test problem.

    python data/addition/evaluate.py --out_dir=out-addition [--ckpt=ckpt.pt] [--device=cpu] [--batch_size=1000]

Each test prompt 'a+b=' is continued greedily (temperature 0); a problem counts as solved when
every answer token (the reversed sum and its end marker) is exactly right. Prints the accuracy
by number of carries, then as the last line e.g.

    exact-match accuracy: 0.9934 (9934/10000)

Every key, its default and meaning: python data/addition/evaluate.py --help
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gptsmith import checkpoint as ckpt_io
from gptsmith import data as ds
from gptsmith.configurator import UserError, cli_errors, load_config, opt, show_progress
from gptsmith.model import GPT
from gptsmith.runtime import Runtime, setup_runtime, teardown


@dataclass
class EvalConfig:
    """Exact-match accuracy of a model trained on data/addition, on its held-out test problems."""

    out_dir: str = opt("out-addition", "training output folder holding the checkpoint")
    ckpt: str = opt("ckpt.pt", "checkpoint file inside out_dir (ckpt.pt = latest saved, best.pt = best val loss)")
    dataset: str = opt("", "dataset folder or name with test.bin; default: the one the checkpoint was trained on")
    batch_size: int = opt(1000, "test problems decoded at once")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: str = opt("auto", "auto, float32, bfloat16, float16")

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")


def load_addition_model(cfg: EvalConfig) -> tuple[GPT, dict[str, Any], str]:
    """The checkpoint's model, its vocabulary and the dataset to test it on, after checking it learned addition."""
    path = Path(cfg.out_dir) / cfg.ckpt
    state = ckpt_io.load_checkpoint(path)
    if (state.get("meta") or {}).get("task") != "addition":
        raise UserError(
            f"{path} was not trained on addition problems (its vocabulary is not data/addition's); "
            "train one with: python train.py config/addition.py"
        )
    return ckpt_io.model_from_checkpoint(state, path), state["meta"], cfg.dataset or state["config"]["dataset"]


def open_test_set(dataset: str, model: GPT, model_meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The test examples (n, L) and their targets (n, L), checked against the model's vocabulary."""
    folder = ds.dataset_dir(dataset)
    meta = ds.load_meta(folder)
    if meta is None or meta.get("task") != "addition":
        raise UserError(f"dataset '{dataset}' is not addition problems; run: python data/addition/prepare.py")
    ds.check_same_vocab(model_meta, meta, "the model", dataset)
    length = meta["example_len"]
    if length > model.config.block_size:
        raise UserError(
            f"dataset '{dataset}' has {length}-token problems ({meta['digits']} digits), longer than the model's "
            f"block_size of {model.config.block_size}; test on the problems it was trained on"
        )
    test = ds.open_split(folder, "test", dataset, meta["vocab_size"], meta)
    return np.asarray(test.tokens).reshape(-1, length), np.asarray(test.targets).reshape(-1, length), meta


@torch.no_grad()
def greedy_continuations(model: GPT, prompts: np.ndarray, n_new: int, batch_size: int, rt: Runtime) -> np.ndarray:
    """The greedy continuation of every prompt, (n, n_new); the prompts have one length, so batches decode at once."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="evaluate", unit="batch", disable=not show_progress()):
        x = torch.from_numpy(prompts[start : start + batch_size].astype(np.int64)).to(rt.device)
        with rt.autocast():
            y = model.generate(x, n_new, temperature=0)
        out.append(y[:, x.size(1) :].cpu().numpy())
    return np.concatenate(out)


def count_carries(a: np.ndarray, b: np.ndarray, digits: int) -> np.ndarray:
    """How many of the digit-wise additions of a + b carry one over."""
    carry = np.zeros(len(a), dtype=np.int64)
    count = np.zeros(len(a), dtype=np.int64)
    for k in range(digits):
        carry = (a // 10**k % 10 + b // 10**k % 10 + carry) >= 10
        count += carry
    return count


def operands(prompts: np.ndarray, itos: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """a and b of each prompt 'a+b='."""
    pairs = ["".join(itos[int(i)] for i in row).rstrip("=").split("+") for row in prompts]
    return np.array([int(a) for a, _ in pairs]), np.array([int(b) for _, b in pairs])


def score(model: GPT, tokens: np.ndarray, targets: np.ndarray, meta: dict, batch_size: int, rt: Runtime) -> np.ndarray:
    """Whether the model answers each test problem exactly: every token that has a target is right."""
    start = meta["prompt_len"]
    answers = greedy_continuations(model, tokens[:, :start], tokens.shape[1] - start, batch_size, rt)
    # Token j of the answer is learned (and checked) when the position before it has a target.
    checked = targets[:, start - 1 : -1] != -1
    return ((answers == tokens[:, start:]) | ~checked).all(axis=1)


def evaluate(cfg: EvalConfig) -> tuple[int, int]:
    """Score the checkpoint on the test problems, print the report; return (solved, problems)."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    try:
        model, model_meta, dataset = load_addition_model(cfg)
        tokens, targets, meta = open_test_set(dataset, model, model_meta)
        solved = score(model.to(rt.device).eval(), tokens, targets, meta, cfg.batch_size, rt)
        a, b = operands(tokens[:, : meta["prompt_len"]], meta["itos"])
        carries = count_carries(a, b, meta["digits"])
        print("by number of carries:")
        for n in range(meta["digits"] + 1):
            group = solved[carries == n]
            print(f"  {n}: {group.mean() if len(group) else 0.0:.4f} ({group.sum()}/{len(group)})")
        print(f"exact-match accuracy: {solved.mean():.4f} ({solved.sum()}/{len(solved)})")
        return int(solved.sum()), len(solved)
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        evaluate(load_config(EvalConfig, argv))


if __name__ == "__main__":
    main()
