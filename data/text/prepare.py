"""Train on your own text: turn text files into a dataset that train.py and sample.py can use.

    python data/text/prepare.py --input=FILE_OR_GLOB --name=NAME [--tokenizer=char|gpt2]
                                [--val_fraction=0.1] [--out_dir=DIR]

writes data/NAME/train.bin and val.bin (uint16), plus meta.pkl for the char tokenizer; then
`python train.py config/shakespeare_char.py --dataset=NAME`. Several files (a glob, e.g. 'notes/**/*.txt') are joined in sorted
order: with gpt2 each file ends with <|endoftext|>, with char a newline separates them. The last
val_fraction of the tokens becomes val.bin. For corpora too big for memory use data/openwebtext.
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptsmith.configurator import UserError, cli_errors, load_config, opt
from gptsmith.prepare import UINT16_LIMIT, TokenWriter, expand_inputs, gpt2, read_text_file

DATA_ROOT = Path(__file__).resolve().parents[1]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_BLOCK_SIZE = 1024  # train.py's default context length: val.bin should be longer than one window


@dataclass
class TextConfig:
    """Turn your own text files into data/NAME/ for `python train.py CONFIG.py --dataset=NAME`."""

    input: str = opt("", "a text file, or a glob of them ('notes/*.txt'); several are joined in sorted order")
    name: str = opt("", "the dataset's name: it goes to data/NAME/ and trains with --dataset=NAME")
    tokenizer: str = opt("char", "char (a vocabulary of the text's characters) or gpt2 (GPT-2 BPE, to finetune GPT-2)")
    val_fraction: float = opt(0.1, "the last this fraction of the tokens becomes val.bin, in (0, 1)")
    out_dir: str = opt("", "where the files go (default: data/NAME)")


def prepare(cfg: TextConfig) -> dict[str, int]:
    """Check the options, encode the files and write the dataset; return token counts per split."""
    out_dir = _out_dir(cfg)
    if cfg.tokenizer not in ("char", "gpt2"):
        raise UserError(f"tokenizer must be char or gpt2, got '{cfg.tokenizer}'")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if not cfg.input:
        raise UserError("pass --input=FILE or --input='GLOB' with the text to train on")
    files = expand_inputs(cfg.input)
    texts = [read_text_file(f) for f in files]
    print(f"{len(files)} file(s), {sum(len(t) for t in texts):,} characters")
    ids, meta = _encode_char(texts) if cfg.tokenizer == "char" else (_encode_gpt2(texts), None)
    n_val = int(round(len(ids) * cfg.val_fraction))
    if n_val < 1 or n_val >= len(ids):
        raise UserError(f"{len(ids)} tokens are too few to split with val_fraction={cfg.val_fraction}")
    if n_val <= DEFAULT_BLOCK_SIZE + 1:
        print(
            f"warning: val.bin gets only {n_val} tokens; train with --block_size below {n_val - 1} "
            "or pass more text or a larger --val_fraction",
            file=sys.stderr,
        )
    with TokenWriter(out_dir) as writer:
        writer.write("train", ids[:-n_val])
        writer.write("val", ids[-n_val:])
        counts = writer.commit(meta)
    dataset_arg = cfg.name if not cfg.out_dir else str(out_dir)
    # train.py alone would train nanoGPT's default, GPT-2 124M: name a config of the right size.
    config = "config/shakespeare_char.py" if cfg.tokenizer == "char" else "config/finetune_shakespeare.py"
    print(f"train with: python train.py {config} --dataset={dataset_arg} --out_dir=out-{Path(dataset_arg).name}")
    if cfg.tokenizer == "char":
        print("  on a CPU, add the CPU settings of README's 'Start here' (a smaller model and context)")
    return counts


def _out_dir(cfg: TextConfig) -> Path:
    if cfg.name and not NAME_PATTERN.fullmatch(cfg.name):
        raise UserError(
            f"--name={cfg.name!r} must be a plain folder name: letters, digits, '.', '_', '-' (no path separators)"
        )
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if not cfg.name:
        raise UserError("pass --name=NAME: the dataset goes to data/NAME/ (or pass --out_dir=DIR)")
    if (DATA_ROOT / cfg.name / "prepare.py").exists():
        raise UserError(f"data/{cfg.name} is a built-in dataset with its own prepare.py; choose another --name")
    return DATA_ROOT / cfg.name


def _encode_char(texts: list[str]) -> tuple[np.ndarray, dict]:
    # files not ending in a newline would run their last line into the next file's first
    text = "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))
    # code points via numpy: a Python loop over a large text takes minutes
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)  # sorted by code point, the order of sorted(set(text))
    if len(vocab) > UINT16_LIMIT:
        raise UserError(f"the text has {len(vocab):,} distinct characters; uint16 tokens allow {UINT16_LIMIT:,}")
    chars = [chr(c) for c in vocab]
    print(f"vocabulary of {len(chars)} characters")
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {ch: i for i, ch in enumerate(chars)},
        "tokenizer": "char",
    }
    ids = np.empty(len(codes), dtype=np.uint16)
    step = 1 << 24  # searchsorted returns int64: a block at a time keeps that to 128 MB
    for start in range(0, len(codes), step):
        ids[start : start + step] = np.searchsorted(vocab, codes[start : start + step])
    return ids, meta


def _encode_gpt2(texts: list[str]) -> np.ndarray:
    enc = gpt2()
    # <|endoftext|> after each file, as GPT-2 saw between its documents
    parts = [np.array([*enc.encode_ordinary(t), enc.eot_token], dtype=np.uint16) for t in texts]
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        prepare(load_config(TextConfig, argv))


if __name__ == "__main__":
    main()
