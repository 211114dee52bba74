"""Addition problems a+b=c, to teach a small GPT arithmetic (the quickest offline demo).

    python data/addition/prepare.py [--digits=3] [--n_test=10000] [--n_val=2000] [--n_train=0] [--seed=1337]

Every example is a fixed-length line: both operands with `digits` digits (zero-padded), the
sum's digits reversed (least significant first, the order in which the carry proceeds), an
end marker '$', then '.' padding up to the common length 3 * digits + 4:

    123+456=975$.     123 + 456 = 579
    999+999=8991$     999 + 999 = 1998

Only the answer digits and the end marker are targets; the prompt and the padding are not
(-1). A problem is the ordered pair (a, b): the test, val and train problems are disjoint
sets drawn with --seed, so no test problem is ever trained on. Writes {train,val,test}.bin
(uint16 tokens), {train,val,test}.targets.bin (int16) and meta.pkl, the dataset-with-targets
format of dataset.py; data/addition/evaluate.py scores a model on test.*.
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptsmith.configurator import UserError, cli_errors, load_config, opt
from gptsmith.prepare import TokenWriter

END, PAD = "$", "."
CHARS = sorted("0123456789+=" + END + PAD)  # '$' '+' '.' '0'..'9' '='
STOI = {ch: i for i, ch in enumerate(CHARS)}
ITOS = dict(enumerate(CHARS))
MAX_DIGITS = 9  # (10**9)**2 pairs still fit int64
MAX_TRAIN = 5_000_000  # n_train=0 takes every remaining pair, up to this many
SPLITS = ("train", "val", "test")


@dataclass
class AdditionConfig:
    """Make data/addition/: disjoint train / val / test sets of addition problems."""

    digits: int = opt(3, f"operands have up to this many digits (1 to {MAX_DIGITS}), written zero-padded")
    n_test: int = opt(10000, "held-out test problems, scored by data/addition/evaluate.py")
    n_val: int = opt(2000, "validation problems, for the val loss during training")
    n_train: int = opt(0, "training problems; 0 = every pair not in test or val")
    seed: int = opt(1337, "seed of the draw of the problems into test, val and train")
    out_dir: str = opt("", "where the files go (default: this script's folder)")


def example_len(digits: int) -> int:
    """Tokens per example: a, '+', b, '=', up to digits + 1 answer digits, the end marker."""
    return 3 * digits + 4


def prompt_len(digits: int) -> int:
    """Tokens of the prompt 'a+b=', after which the answer starts."""
    return 2 * digits + 2


def split_problems(cfg: AdditionConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (a, b) operands of each split, drawn without replacement from all ordered pairs."""
    if not 1 <= cfg.digits <= MAX_DIGITS:
        raise UserError(f"digits must be between 1 and {MAX_DIGITS}, got {cfg.digits}")
    for key in ("n_test", "n_val"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.n_train < 0:
        raise UserError(f"n_train must not be negative, got {cfg.n_train}")
    base = 10**cfg.digits
    n_pairs = base * base
    n_train = cfg.n_train or n_pairs - cfg.n_test - cfg.n_val
    if n_train <= 0 or cfg.n_test + cfg.n_val + n_train > n_pairs:
        raise UserError(
            f"{cfg.digits}-digit operands make only {n_pairs:,} problems, fewer than n_test + n_val + n_train "
            f"({cfg.n_test:,} + {cfg.n_val:,} + {cfg.n_train:,}, and train needs some); lower them or raise --digits"
        )
    if n_train > MAX_TRAIN:
        raise UserError(f"{n_train:,} training problems are too many to write; pass --n_train (e.g. 1000000)")
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(n_pairs, size=cfg.n_test + cfg.n_val + n_train, replace=False)  # distinct pair indices
    bounds = np.cumsum([cfg.n_test, cfg.n_val])
    test, val, train = np.split(chosen, bounds)
    return {name: (idx // base, idx % base) for name, idx in (("train", train), ("val", val), ("test", test))}


def digits_of(x: np.ndarray, n: int) -> np.ndarray:
    """The n lowest decimal digits of each number, least significant first: (len(x), n)."""
    return x[:, None] // 10 ** np.arange(n, dtype=np.int64) % 10


def encode(a: np.ndarray, b: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, L) of the examples 'a+b=reversed(c)$..' and their targets (n, L), -1 = none."""
    n, length, start = len(a), example_len(digits), prompt_len(digits)
    zero = STOI["0"]  # the digit tokens are consecutive, '0' to '9'
    ids = np.full((n, length), STOI[PAD], dtype=np.int64)
    ids[:, :digits] = zero + digits_of(a, digits)[:, ::-1]  # operands most significant first, as written
    ids[:, digits] = STOI["+"]
    ids[:, digits + 1 : 2 * digits + 1] = zero + digits_of(b, digits)[:, ::-1]
    ids[:, 2 * digits + 1] = STOI["="]
    c = a + b
    n_out = 1 + (c[:, None] >= 10 ** np.arange(1, digits + 1, dtype=np.int64)).sum(axis=1)  # digits of c
    slot = np.arange(digits + 1)
    ids[:, start : start + digits + 1] = np.where(slot < n_out[:, None], zero + digits_of(c, digits + 1), STOI[PAD])
    ids[np.arange(n), start + n_out] = STOI[END]
    # targets[i] is the token after position i: learned from '=' (predicting the first answer digit)
    # to the last answer digit (predicting the end marker); the prompt and the padding are not.
    pos = np.arange(length - 1)
    learn = (pos >= start - 1) & (pos <= start - 1 + n_out[:, None])
    targets = np.full((n, length), -1, dtype=np.int16)
    targets[:, :-1] = np.where(learn, ids[:, 1:], -1)
    return ids.astype(np.uint16), targets


def decode(ids: np.ndarray) -> str:
    return "".join(ITOS[int(i)] for i in ids)


def prepare(cfg: AdditionConfig) -> dict[str, int]:
    """Draw the problems, encode them and write the dataset; return token counts per file."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(__file__).parent
    problems = split_problems(cfg)
    encoded = {split: encode(a, b, cfg.digits) for split, (a, b) in problems.items()}
    for line in encoded["train"][0][:3]:
        print(decode(line))
    meta = {
        "vocab_size": len(CHARS),
        "stoi": STOI,
        "itos": ITOS,
        "tokenizer": "char",
        "example_len": example_len(cfg.digits),
        "targets_dtype": "int16",
        "task": "addition",  # evaluate.py checks it, and reads the rest
        "digits": cfg.digits,
        "prompt_len": prompt_len(cfg.digits),
        "end": END,
        "problems": {split: len(a) for split, (a, _) in problems.items()},
        "seed": cfg.seed,
    }
    files = [*SPLITS, *(f"{s}.targets" for s in SPLITS)]
    with TokenWriter(out_dir, files) as writer:  # all files appear at once, or none
        for split, (ids, targets) in encoded.items():
            writer.write(split, ids.reshape(-1))
            writer.write(f"{split}.targets", targets.reshape(-1).view(np.uint16))  # the int16 bytes, as they are
        counts = writer.commit(meta)
    print(f"train with: python train.py config/addition.py (examples of {example_len(cfg.digits)} tokens)")
    return counts


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        prepare(load_config(AdditionConfig, argv))


if __name__ == "__main__":
    main()
