"""Tiny Shakespeare as characters: train.bin / val.bin (uint16) and meta.pkl.

    python data/shakespeare_char/prepare.py [--input=PATH] [--out_dir=DIR]

The text comes from --input, else input.txt beside this script, else a download.
"""

from __future__ import annotations

from pathlib import Path

from gptsmith.prepare import read_input_text, run_prepare, write_splits

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(input_path: str | None, out_dir: Path) -> dict[str, int]:
    """Encode the text character by character; return token counts per split."""
    text = read_input_text(input_path, Path(__file__).parent / "input.txt", URL)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    print(f"{len(text):,} characters, vocabulary of {len(chars)}: {''.join(chars)!r}")
    ids = [stoi[c] for c in text]
    n = int(0.9 * len(ids))
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi, "tokenizer": "char"}
    return write_splits(out_dir, {"train": ids[:n], "val": ids[n:]}, meta)


def main(argv: list[str] | None = None) -> None:
    run_prepare(prepare, Path(__file__).parent, argv)


if __name__ == "__main__":
    main()
