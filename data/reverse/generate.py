"""Reverse a string of digits: '3141>1413.' -- a dataset made on the fly, with no files to prepare.

    python train.py config/reverse.py

The model sees the digits and '>' and learns to write them backwards and then '.'; only that
answer is a target, so the loss says how well it reverses, not how well it guesses random
digits. gptsmith.generated explains the interface: meta, block_size and example(rng).
"""

import numpy as np

MAX_DIGITS = 8
CHARS = "0123456789>."
meta = {"vocab_size": len(CHARS), "stoi": {c: i for i, c in enumerate(CHARS)}, "itos": dict(enumerate(CHARS))}
block_size = 2 * MAX_DIGITS + 1  # digits '>' answer '.', less the last token (only a target)


def example(rng: np.random.Generator) -> tuple[list[int], list[int]]:
    digits = "".join(rng.choice(list("0123456789"), size=rng.integers(1, MAX_DIGITS + 1)))
    text = f"{digits}>{digits[::-1]}."
    ids = [meta["stoi"][c] for c in text]
    tokens, nexts = ids[:-1], ids[1:]  # after each token, the next one is what to predict...
    answer_from = len(digits)  # ...but only from '>' on: the digits themselves are random
    targets = [-1] * answer_from + nexts[answer_from:]
    return tokens, targets
