"""A calculator in GPT: 'a op b' for op in + - * / and 0 <= a, b <= 999, answered through a chain of thought.

    python train.py config/calculator.py
    python data/calculator/evaluate.py --out_dir=out-calculator
    python data/calculator/calc.py --out_dir=out-calculator "12*(34+5)-6"

Generated on the fly (gptsmith.generated): every training row is a fresh problem. An example is
the prompt, both operands zero-padded to three digits, then the trace, '>', the answer and '.':

    123+456=9750>579.
    123-456=766-333+>-333.
    123*456=81317051116021904088860880650>56088.
    017/005=000000000000000+5999-000 ... (three long-division steps, below) ... >3 r 2.

Every number inside a trace is written least significant digit first, the order in which
carries and borrows travel, so each trace token depends on a few tokens at fixed distances
before it; the answer then reads the result backwards, without leading zeros.

    +   the sum, 4 digits.
    -   a-b and then b-a, each as 3 digits modulo 1000 and its sign ('+' or '-'): the answer
        is whichever is not negative, signed.
    *   a x each digit of b (least significant first), 6 tokens each: for each digit of a a
        digit of the product and the carry (0..8) into the next (the last carry is the fourth
        digit); then the running sums a*b0 + 10 a*b1 (5 digits) and + 100 a*b2 (6 digits).
    /   long division, one step per digit of a (most significant first), 31 tokens each:
        R  the remainder so far times 10 plus the next digit of a (4 digits),
        g  a guess of the quotient digit q = R // b,
        P  g x b with carries (6 tokens, as for *),
        D  R - P and then X = D - b, each as 4 digits modulo 10**4 and its sign,
        q  the quotient digit: g, less one if D is negative, plus one if X is not,
        Q  q x b with carries (6 tokens),
        r  the new remainder R - Q (3 digits).
        The guess is the one token no local rule gives, so that is where a model errs. A guess
        one off either way is corrected: the signs of D and X say which way, and the remainder is
        then worked out afresh from the corrected digit, never picked from D or X, so every step
        does the same operations whichever way its guess went. In training 30% of the guesses
        are deliberately one off (their target masked, so the model never learns to guess wrong)
        so that the model learns the corrections too, most of them one high (wrong_guesses).

Only the trace, the answer and the final '.' are targets. A problem is held out (the val split,
and data/calculator/evaluate.py's test problems) by a hash of its prompt, so none is ever trained on.
Operands have k digits with chance proportional to k, divisors mostly 2 digits (Calculator.length_chances). The same format with wider operands is
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
WRONG_GUESS = 0.3  # the share of long-division guesses made one off in training
HIGH_GUESS = 0.7  # of those, the share made one high where both ways are possible (see wrong_guesses)
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


class Calculator:
    """The problems and traces for operands of up to `width` digits (written zero-padded to it).
    Training draws operands of up to `train_width` digits (default: width); evaluation takes every
    length up to width, so a narrower train_width measures accuracy beyond the trained range."""

    def __init__(self, width: int, train_width: int | None = None) -> None:
        w = self.width = width
        self.train_width = train_width or width
        if not 1 <= self.train_width <= width:
            raise ValueError(f"train_width {train_width} is not in 1..{width}")
        self.trained_max = 10**self.train_width - 1  # the largest operand training draws
        self.max_operand = 10**w - 1
        self.prompt_len = 2 * w + 2  # 'aaa?bbb='
        self.step_len = 8 * w + 7  # one long-division step: R, g, P, D and X with their signs, q, Q, r
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
            q = r // b
            g = q + (wrong[k] if wrong else 0)
            d = r - g * b
            x = d - b
            rem = r - q * b
            out += rev(r, w + 1) + str(g) + self.times_digit(b, g) + rev(d, w + 1) + sign(d) + rev(x, w + 1) + sign(x)
            out += str(q) + self.times_digit(b, q) + rev(rem, w)
        return out

    def prompt(self, a: int, op: str, b: int) -> str:
        return f"{a:0{self.width}d}{op}{b:0{self.width}d}="

    def text(self, a: int, op: str, b: int, wrong: list[int] | None = None) -> str:
        """The whole example: prompt, trace, '>', answer, '.'."""
        return f"{self.prompt(a, op, b)}{self.trace(a, op, b, wrong)}>{answer(a, op, b)}."

    def operand(self, rng: np.random.Generator, low: int = 0, chances: np.ndarray | None = None) -> int:
        """The number of digits first, drawn by chances (lengths 1..width), then a number of that many
        uniformly. chances=None gives every length the same chance, as evaluate.py tests."""
        n = int(rng.choice(np.arange(1, self.width + 1), p=chances))
        return int(rng.integers(max(low, 0 if n == 1 else 10 ** (n - 1)), 10**n))

    def length_chances(self, divisor: bool = False) -> np.ndarray:
        """The training chances of an operand's lengths 1..width (0 beyond train_width). k digits come with chance
        proportional to k (3 digits half the time at width 3): the long operands are where the
        model errs, and the few short problems are soon learned. A divisor's lengths go otherwise:
        the hardest guesses are those of a multi-digit quotient by a divisor of several digits
        (3 by 2 digits at width 3), so the middle lengths share half, the shortest (long quotients,
        easy guesses) has 30% and the longest (one real step) 20%."""
        n = self.train_width  # lengths beyond it are never drawn for training
        k = np.arange(1, n + 1, dtype=float)
        if not divisor:
            chances = k / k.sum()
        elif n < 3:
            chances = np.full(n, 1 / n)
        else:
            chances = np.array([0.3] + [0.5 / (n - 2)] * (n - 2) + [0.2])
        return np.concatenate([chances, np.zeros(self.width - n)])

    def draw(self, rng: np.random.Generator, op: str | None = None, balanced: bool = False) -> tuple[int, str, int]:
        """A random problem (a, op, b); op drawn by OP_SHARE unless given. Training's operand
        lengths (length_chances) unless balanced, which gives every length the same chance."""
        if op is None:
            op = OPS[int(rng.choice(len(OPS), p=[OP_SHARE[o] for o in OPS]))]
        a = self.operand(rng, 0, None if balanced else self.length_chances())
        return a, op, self.operand(rng, 1 if op == "/" else 0, None if balanced else self.length_chances(op == "/"))

    def wrong_guesses(self, rng: np.random.Generator, a: int, b: int) -> list[int]:
        """For each long-division step, 0 or how far its guess is made off: WRONG_GUESS of them by one,
        where the guess stays a digit; one high with chance HIGH_GUESS where both ways are possible.
        High guesses get the larger share because after them the remainder R - Q equals neither D
        nor X: it must be worked out digit by digit with its borrows, while after a right guess (or a
        low one) it can be read off D (or X). A model that saw too few of them learned the
        subtraction there badly: one seed's divisions mostly failed at r after a high guess. The
        quotient digit of step k is the k-th digit of a // b."""
        out = []
        for k in range(self.width):
            q = digit(a // b, self.width - 1 - k)
            ways = [off for off in (-1, 1) if 0 <= q + off <= 9]
            if not ways or rng.random() >= WRONG_GUESS:
                out.append(0)
            else:
                out.append(ways[0] if len(ways) == 1 else 1 if rng.random() < HIGH_GUESS else -1)
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
