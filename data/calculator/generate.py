"""A calculator in GPT: 'a op b' for op in + - * / and 0 <= a, b <= 999, answered through a chain of thought.

    python train.py config/calculator.py
    python data/calculator/evaluate.py --out_dir=out-calculator
    python data/calculator/calc.py --out_dir=out-calculator "12*(34+5)-6"

Generated on the fly (gptsmith.generated): every training row is a fresh problem. An example is
the prompt, both operands zero-padded to three digits, then the trace, '>', the answer and '.':

    123+456=9750>579.
    123-456=766-333+>-333.
    123*456=813170511160294010888608806500>56088.
    017/005=0000000000000005999-0999-0000 ... (three long-division steps, below) ... >3 r 2.

Every number inside a trace is written least significant digit first, the order in which
carries and borrows travel, so each trace token depends on a few tokens at fixed distances
before it; the answer then reads the result backwards, without leading zeros.

    +   the sum, 4 digits.
    -   a-b and then b-a, each as 3 digits modulo 1000 and its sign ('+' or '-'): the answer
        is whichever is not negative, signed.
    *   a x each digit of b (least significant first), 6 tokens each: for each digit of a a
        digit of the product and the carry (0..8) into the next (the last carry is the fourth
        digit); then the running sums a*b0 + 10 a*b1 (5 digits) and + 100 a*b2 (6 digits).
    /   long division, one step per digit of a (most significant first), 29 tokens each:
        R  the remainder so far times 10 plus the next digit of a (4 digits),
        g  a guess of the quotient digit q = R // b, aimed one low: q - 1 (0 when q is 0),
        P  g x b with carries (6 tokens, as for *),
        D  R - P (4 digits),
        X  D - b, and then Y = X - b, each as 4 digits modulo 10**4 and its sign,
        q  the quotient digit: g, plus one for each of X and Y that is not negative,
        r  the new remainder, 3 digits: the last of D, X, Y that is not negative.
        The guess is the one step no local rule gives, so that is where a model errs; aimed at
        q - 1, a guess off by one either way (q - 2 or q) is still corrected by the two
        subtractions, which are the same operation in every step. In training 40% of the
        guesses are deliberately one off (their target masked, so the model never learns to
        guess wrong) so that the model learns the corrections too.

Only the trace, the answer and the final '.' are targets. A problem is held out (the val split,
and data/calculator/evaluate.py's test problems) by a hash of its prompt, so none is ever trained on.
Operands have k digits with chance proportional to k (Calculator.operand). The same format with wider operands is
Calculator(width): data/calculator4/generate.py is this one at four digits.
"""

from __future__ import annotations

import numpy as np

OPS = "+-*/"
CHARS = "0123456789+-*/=>r ."
WIDTH = 3  # digits of an operand: 0..999
# The vocabulary; checkpoints keep it, with the operands' width, so evaluate.py and calc.py know their model.
meta = {"vocab_size": len(CHARS), "stoi": {c: i for i, c in enumerate(CHARS)}, "itos": dict(enumerate(CHARS))}
meta["calculator_width"] = WIDTH
OP_SHARE = {"+": 0.12, "-": 0.13, "*": 0.35, "/": 0.4}  # of training problems: the longer traces need more
WRONG_GUESS = 0.4  # the share of long-division guesses made one off in training
val_share = 0.05


def rev(n: int, width: int) -> str:
    """n modulo 10**width, its digits least significant first: rev(738, 4) == '8370'."""
    return str(n % 10**width).zfill(width)[::-1]


def sign(n: int) -> str:
    return "-" if n < 0 else "+"


def digit(n: int, k: int) -> int:
    return n // 10**k % 10


def encode(s: str) -> list[int]:
    return [meta["stoi"][c] for c in s]


def answer(a: int, op: str, b: int) -> str:
    """The answer the model must end with: '579', '-333', '56088', '3 r 2'."""
    if op == "+":
        return str(a + b)
    if op == "-":
        return str(a - b)
    if op == "*":
        return str(a * b)
    if b == 0:
        raise ZeroDivisionError("division by zero")
    return f"{a // b} r {a % b}"


def guess(q: int) -> int:
    """The guess a long-division step aims at for the quotient digit q: one low, so that a guess off
    by one either way leaves R - g*b not negative, to be corrected by subtracting b at most twice."""
    return max(q - 1, 0)


class Calculator:
    """The problems and traces for operands of up to `width` digits (written zero-padded to it)."""

    def __init__(self, width: int) -> None:
        w = self.width = width
        self.max_operand = 10**w - 1
        self.prompt_len = 2 * w + 2  # 'aaa?bbb='
        self.step_len = 7 * w + 8  # one long-division step: R, g, P, D, X and its sign, Y and its sign, q, r
        sums = sum(w + j + 1 for j in range(1, w))
        self.trace_len = {"+": w + 1, "-": 2 * w + 2, "*": 2 * w * w + sums, "/": w * self.step_len}
        longest = f">{self.max_operand} r {self.max_operand - 1}."
        self.block_size = self.prompt_len + self.trace_len["/"] + len(longest) - 1  # less the last token

    def times_digit(self, a: int, d: int) -> str:
        """a x d (d one digit), 2 * width tokens: for each digit of a, the product's digit and the carry on."""
        out, carry = "", 0
        for k in range(self.width):
            t = digit(a, k) * d + carry
            carry = t // 10
            out += f"{t % 10}{carry}"
        return out

    def trace(self, a: int, op: str, b: int, wrong: list[int] | None = None) -> str:
        """The chain of thought for a op b (without prompt and answer). For '/', wrong[k] (-1, 0 or +1)
        shifts the guess of step k off the quotient digit; None guesses right."""
        w = self.width
        if op == "+":
            return rev(a + b, w + 1)
        if op == "-":
            return rev(a - b, w) + sign(a - b) + rev(b - a, w) + sign(b - a)
        if op == "*":
            partials = "".join(self.times_digit(a, digit(b, j)) for j in range(w))
            sums = "".join(rev(a * (b % 10 ** (j + 1)), w + j + 1) for j in range(1, w))  # the running sums
            return partials + sums
        out, rem = "", 0
        for k in range(w):
            r = rem * 10 + digit(a, w - 1 - k)
            g = guess(r // b) + (wrong[k] if wrong else 0)
            d = r - g * b
            x, y = d - b, d - 2 * b
            rem = y if y >= 0 else x if x >= 0 else d
            out += rev(r, w + 1) + str(g) + self.times_digit(b, g) + rev(d, w + 1)
            out += rev(x, w + 1) + sign(x) + rev(y, w + 1) + sign(y) + str(g + (x >= 0) + (y >= 0)) + rev(rem, w)
        return out

    def prompt(self, a: int, op: str, b: int) -> str:
        return f"{a:0{self.width}d}{op}{b:0{self.width}d}="

    def text(self, a: int, op: str, b: int, wrong: list[int] | None = None) -> str:
        """The whole example: prompt, trace, '>', answer, '.'."""
        return f"{self.prompt(a, op, b)}{self.trace(a, op, b, wrong)}>{answer(a, op, b)}."

    def operand(self, rng: np.random.Generator, low: int = 0, balanced: bool = False) -> int:
        """The number of digits first, then a number of that many uniformly. For training, k digits
        come with chance proportional to k (3 digits half the time at width 3): the long operands are
        where the model errs, and the few short problems are soon learned. balanced=True gives
        every length the same chance, as evaluate.py tests."""
        lengths = np.arange(1, self.width + 1)
        n = int(rng.choice(lengths, p=None if balanced else lengths / lengths.sum()))
        return int(rng.integers(max(low, 0 if n == 1 else 10 ** (n - 1)), 10**n))

    def draw(self, rng: np.random.Generator, op: str | None = None, balanced: bool = False) -> tuple[int, str, int]:
        """A random problem (a, op, b); op drawn by OP_SHARE unless given."""
        if op is None:
            op = OPS[int(rng.choice(len(OPS), p=[OP_SHARE[o] for o in OPS]))]
        # A divisor's length is drawn uniformly even in training: a short divisor makes the long
        # quotients, whose every step needs a guess.
        return self.operand(rng, 0, balanced), op, self.operand(rng, 1 if op == "/" else 0, balanced or op == "/")

    def wrong_guesses(self, rng: np.random.Generator, a: int, b: int) -> list[int]:
        """For each long-division step, 0 or how far its guess is made off: WRONG_GUESS of them by one,
        up or down, where the guess stays within 0..q. The quotient digit of step k is the k-th digit
        of a // b."""
        out = []
        for k in range(self.width):
            q = digit(a // b, self.width - 1 - k)
            ways = [off for off in (-1, 1) if 0 <= guess(q) + off <= q]
            out.append(int(rng.choice(ways)) if ways and rng.random() < WRONG_GUESS else 0)
        return out

    def example(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """One training example (gptsmith.generated): tokens, and the next token of each where it is learned."""
        a, op, b = self.draw(rng)
        wrong = self.wrong_guesses(rng, a, b) if op == "/" else None
        ids = encode(self.text(a, op, b, wrong))
        tokens, targets = ids[:-1], ids[1:]
        start = self.prompt_len - 1  # the '=': the first position whose next token is learned
        targets[:start] = [-1] * start  # the operands are random: nothing to learn there
        for k, off in enumerate(wrong or []):  # a wrong guess is context to learn the correction from, never a target
            if off:
                targets[start + k * self.step_len + self.width + 1] = -1
        return tokens, targets


CALCULATOR = Calculator(WIDTH)
block_size = CALCULATOR.block_size
example = CALCULATOR.example
