"""A calculator whose every arithmetic step is done by a GPT trained on data/calculator.

    python data/calculator/calc.py --out_dir=out-calculator "17/5" "12*(34+5)-6"
    echo "999*999" | python data/calculator/calc.py --out_dir=out-calculator
    python data/calculator/calc.py --out_dir=out-calculator --show_trace=True "123-456"

Prints one line per expression, the answer only: '3 r 2', '462', '998001', '-333'. Expressions
take whole numbers 0..999, + - * / and parentheses, with the usual precedence (* and / before
+ and -, left to right otherwise). Python only parses: it splits an expression into steps
'a op b', and the model computes each, innermost first, its answers becoming the next steps'
operands. A step whose operand leaves 0..999 (the trained range; 0..9999 for a model trained on
data/calculator4), a division by zero, or a
division inside a larger expression that leaves a remainder, ends the expression with one
`error:` line (exit 2). With no expressions, one is read from each line of standard input.

Every key, its default and meaning: python data/calculator/calc.py --help
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gptsmith.config import CheckpointKeys, RuntimeKeys
from gptsmith.configurator import UserError, cli_errors, load_config, opt
from gptsmith.model import GPT
from gptsmith.runtime import Runtime, setup_runtime, teardown

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen  # noqa: E402
import solver  # noqa: E402


@dataclass
class CalcConfig(RuntimeKeys, CheckpointKeys):
    """Evaluate arithmetic expressions with a calculator model, every step done by the model."""

    out_dir: str = opt("out-calculator", "training output folder holding the checkpoint")
    show_trace: bool = opt(False, "print each step the model wrote (prompt, trace, '>', answer) before the answer")


# An expression is a number or a step (op, left, right) over expressions.
Expr = int | tuple[str, "Expr", "Expr"]
TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+)|(\d+)|(.))")


def parse(text: str) -> Expr:
    """The expression tree of text, or a UserError saying what is wrong with it."""
    tokens = []
    for m in TOKEN.finditer(text.strip()):
        decimal, number, other = m.groups()
        if decimal:
            raise UserError(f"{text!r}: {decimal} is not a whole number; the calculator knows whole numbers only")
        if number:
            tokens.append(int(number))
        elif other not in "+-*/()":
            raise UserError(f"{text!r}: unexpected {other!r}; use whole numbers, + - * / and parentheses")
        else:
            tokens.append(other)
    if not tokens:
        raise UserError("an empty expression; give e.g. 12*(34+5)-6")
    tree, rest = _sum(tokens, text)
    if rest:
        raise UserError(f"{text!r}: unexpected {rest[0]!r} after a complete expression")
    return tree


def _sum(tokens: list, text: str) -> tuple[Expr, list]:
    left, tokens = _product(tokens, text)
    while tokens and tokens[0] in ("+", "-"):
        right, rest = _product(tokens[1:], text)
        left, tokens = (tokens[0], left, right), rest
    return left, tokens


def _product(tokens: list, text: str) -> tuple[Expr, list]:
    left, tokens = _operand(tokens, text)
    while tokens and tokens[0] in ("*", "/"):
        right, rest = _operand(tokens[1:], text)
        if tokens[0] == "/" and right == 0:
            raise UserError(f"{text!r}: division by zero")
        left, tokens = (tokens[0], left, right), rest
    return left, tokens


def _operand(tokens: list, text: str) -> tuple[Expr, list]:
    if not tokens:
        raise UserError(f"{text!r} ends where a number or '(' should come")
    first, rest = tokens[0], tokens[1:]
    if isinstance(first, int):
        return first, rest
    if first == "(":
        inner, rest = _sum(rest, text)
        if not rest or rest[0] != ")":
            raise UserError(f"{text!r}: a '(' is not closed")
        return inner, rest[1:]
    if first == "-":
        raise UserError(f"{text!r}: negative numbers are outside the trained range, whole numbers from 0")
    raise UserError(f"{text!r}: unexpected {first!r} where a number or '(' should come")


class Evaluation:
    """One expression being worked out: its tree shrinks as the model answers its steps."""

    def __init__(self, text: str, calc: gen.Calculator) -> None:
        self.text, self.tree, self.calc = text, parse(text), calc
        for n in _numbers(self.tree):
            if n > calc.trained_max:
                raise UserError(f"{text!r}: {n} is outside 0..{calc.trained_max}, the range the model was trained on")
        self.traces: list[str] = []
        self.answer = str(self.tree) if isinstance(self.tree, int) else ""  # a lone number is its own answer
        self.error = ""

    def ready(self) -> list[tuple[int, str, int]]:
        """The steps whose operands are both known (every one of them, so they go to the model together)."""
        if self.answer or self.error:
            return []
        return sorted(set(_ready(self.tree)))

    def check(self, step: tuple[int, str, int]) -> str:
        """Why this step cannot be put to the model ('' if it can)."""
        a, op, b = step
        for x in (a, b):
            if not 0 <= x <= self.calc.trained_max:
                return (
                    f"{self.text!r}: an intermediate result, {x}, is outside 0..{self.calc.trained_max}, "
                    "the range the model was trained on"
                )
        if op == "/" and b == 0:
            return f"{self.text!r}: division by zero ({a}/{b})"
        return ""

    def take(self, answers: dict[tuple[int, str, int], solver.Solution]) -> None:
        """Put the model's answers into the tree; the expression's answer once the root is answered."""
        try:
            self.tree = self._fill(self.tree, answers)
        except UserError as e:
            self.error = str(e)

    def _fill(self, e: Expr, answers: dict) -> Expr:
        if isinstance(e, int):
            return e
        op, left, right = e
        if isinstance(left, int) and isinstance(right, int):
            solution = answers[(left, op, right)]
            self.traces.append(solution.prompt + solution.written)
            if e is self.tree:  # the last step: its answer is printed as the model wrote it
                if not solution.answer:
                    raise UserError(f"{self.text!r}: the model wrote no answer for {left}{op}{right}")
                self.answer = solution.answer
                return e
            return self._value(solution, left, op, right)
        return (op, self._fill(left, answers), self._fill(right, answers))

    def _value(self, solution: solver.Solution, a: int, op: str, b: int) -> int:
        """The number the model's answer stands for, as an operand of the next step."""
        m = re.fullmatch(r"(-?\d+)(?: r (\d+))?", solution.answer)
        if not m:
            raise UserError(f"{self.text!r}: the model wrote no readable answer for {a}{op}{b}: {solution.answer!r}")
        if m.group(2) is not None and int(m.group(2)) != 0:
            raise UserError(
                f"{self.text!r}: {a}/{b} leaves a remainder ({solution.answer}); inside a larger expression "
                "a division must come out even"
            )
        return int(m.group(1))


def _numbers(e: Expr) -> list[int]:
    return [e] if isinstance(e, int) else _numbers(e[1]) + _numbers(e[2])


def _ready(e: Expr) -> list[tuple[int, str, int]]:
    if isinstance(e, int):
        return []
    op, left, right = e
    if isinstance(left, int) and isinstance(right, int):
        return [(left, op, right)]
    return _ready(left) + _ready(right)


def calculate(model: GPT, calc: gen.Calculator, texts: list[str], rt: Runtime) -> list[Evaluation]:
    """Work out every expression, a round of model calls per level of the trees (batched across them)."""
    evaluations = [Evaluation(t, calc) for t in texts]
    while True:
        pending = []
        for ev in evaluations:
            steps = ev.ready()  # empty once the expression is answered or has failed
            if steps:
                ev.error = next(filter(None, map(ev.check, steps)), "")
                if not ev.error:
                    pending.append((ev, steps))
        if not pending:
            return evaluations
        wanted = sorted({step for _, steps in pending for step in steps})
        answers = dict(zip(wanted, solver.solve(model, calc, wanted, rt), strict=True))
        for ev, _ in pending:
            ev.take(answers)


def run(cfg: CalcConfig, texts: list[str]) -> None:
    """Print each expression's answer (and with show_trace the model's steps); a UserError for the
    first expression that cannot be worked out, after the answers before it."""
    if not texts:
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise UserError('no expression given; pass some, e.g. "12*(34+5)-6", or one per line on stdin')
    for t in texts:
        parse(t)  # every expression is read before the model is loaded: a typo costs nothing
    rt = setup_runtime(cfg.device, cfg.dtype, sdpa_backend=cfg.sdpa_backend)
    try:
        model, calc = solver.load_calculator(cfg.checkpoint_path())
        for ev in calculate(model.to(rt.device).eval(), calc, texts, rt):
            if cfg.show_trace:
                for trace in ev.traces:
                    print(f"  {trace}")
            if ev.error:
                raise UserError(ev.error)
            print(ev.answer, flush=True)
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with cli_errors():
        keys = [a for a in argv if a.startswith("--")]
        run(load_config(CalcConfig, keys), [a for a in argv if not a.startswith("--")])


if __name__ == "__main__":
    main()
