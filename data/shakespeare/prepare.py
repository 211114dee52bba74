"""Tiny Shakespeare as GPT-2 BPE tokens, for finetuning GPT-2: train.bin / val.bin (uint16), no meta.pkl.

    python data/shakespeare/prepare.py [--input=PATH] [--out_dir=DIR]

The text comes from --input, else input.txt beside this script, else a download. The first 90% of
the text becomes train.bin, the last 10% val.bin. Offline, tiktoken needs TIKTOKEN_CACHE_DIR.
"""

from __future__ import annotations

from pathlib import Path

from gptsmith.prepare import gpt2, read_input_text, run_prepare, write_splits

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(input_path: str | None, out_dir: Path) -> dict[str, int]:
    """Encode the text with GPT-2 BPE; return token counts per split."""
    text = read_input_text(input_path, Path(__file__).parent / "input.txt", URL)
    enc = gpt2()
    n = int(0.9 * len(text))
    # split the text first, then encode each part, so no token straddles the boundary
    splits = {"train": enc.encode_ordinary(text[:n]), "val": enc.encode_ordinary(text[n:])}
    print(f"{len(text):,} characters")
    return write_splits(out_dir, splits, None)


def main(argv: list[str] | None = None) -> None:
    run_prepare(prepare, Path(__file__).parent, argv)


if __name__ == "__main__":
    main()
