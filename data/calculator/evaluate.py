"""Score a calculator trained on data/calculator: exact-match accuracy per operation on held-out problems.

    python data/calculator/evaluate.py --out_dir=out-calculator [--n_per_op=2500]

Problems come from the held-out split (a hash of the prompt, gptsmith.generated: none was ever
trained on), distinct, each operand's length (1, 2 or 3 digits) drawn uniformly and then the number;
short operands make few problems, so they come less often than that. Each problem is answered
greedily; it counts when the answer after '>' is exactly right. Prints, per
operation, the accuracy by the operands' digits and by carries (+), borrows (-), carries of the
partial products (*) or the length of the quotient (/), then as the last line

    exact-match accuracy: +0.99xx -0.99xx *0.99xx /0.99xx

Every key, its default and meaning: python data/calculator/evaluate.py --help
"""

# no `from __future__ import annotations`: tests import this file unregistered in sys.modules, where
# dataclasses cannot resolve string annotations
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptsmith.config import CheckpointKeys, RuntimeKeys
from gptsmith.configurator import cli_errors, load_config, opt
from gptsmith.runtime import setup_runtime, teardown

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen  # noqa: E402
import solver  # noqa: E402


@dataclass
class EvalConfig(RuntimeKeys, CheckpointKeys):
    """Exact-match accuracy of a calculator model, per operation, on held-out problems."""

    out_dir: str = opt("out-calculator", "training output folder holding the checkpoint")
    seed: int = opt(1234, "seed of the draw of the problems (from the held-out split whatever the seed)")
    n_per_op: int = opt(2500, "held-out problems per operation")
    batch_size: int = opt(500, "problems decoded at once")

    def check(self) -> None:
        self.positive("n_per_op", "batch_size")


def difficulty(calc: gen.Calculator, a: int, op: str, b: int) -> str:
    """What makes a problem harder, by operation: carries, borrows, partial-product carries, quotient digits."""
    digits = range(1, calc.width + 2)
    if op == "+":
        return f"{sum(a % 10**k + b % 10**k >= 10**k for k in digits)} carries"
    if op == "-":
        hi, lo = max(a, b), min(a, b)
        return f"{sum(hi % 10**k < lo % 10**k for k in digits)} borrows"
    if op == "*":
        partials = [calc.times_digit(a, gen.digit(b, j)) for j in range(calc.width)]
        return f"{sum(p[1::2] != '0' * calc.width for p in partials)} partial products with carries"
    return f"{len(str(a // b))}-digit quotient"


def longest(calc: gen.Calculator, a: int, b: int) -> str:
    """The longer operand's digits, marked where training never drew that length (data/calculator_beyond)."""
    n = max(len(str(a)), len(str(b)))
    return f"{n}" + (" (beyond training)" if n > calc.train_width else "")


def breakdown(problems: list[tuple[int, str, int]], right: np.ndarray, rows: list[int], key) -> str:
    """The accuracy of the given rows grouped by key(a, op, b), with each group's size."""
    groups = defaultdict(list)
    for i in rows:
        groups[key(*problems[i])].append(right[i])
    return "  ".join(f"{g}: {np.mean(v):.4f} ({len(v)})" for g, v in sorted(groups.items()))


def report(calc: gen.Calculator, problems: list[tuple[int, str, int]], right: np.ndarray) -> dict[str, float]:
    """Print the breakdown per operation, then by the longest operand over all; return the accuracy of each op."""
    accuracy = {}
    by_longest = lambda a, op, b: longest(calc, a, b)  # noqa: E731
    for op in gen.OPS:
        rows = [i for i, p in enumerate(problems) if p[1] == op]
        accuracy[op] = float(right[rows].mean())
        print(f"{op}  {accuracy[op]:.4f} ({right[rows].sum()}/{len(rows)})")
        for title, key in (
            ("digits", lambda a, op, b: f"{len(str(a))}{op}{len(str(b))}"),
            ("by", lambda a, op, b: difficulty(calc, a, op, b)),
            ("longest operand", by_longest),
        ):
            print(f"   {title}: {breakdown(problems, right, rows, key)}")
    print(f"all ops by the longest operand: {breakdown(problems, right, list(range(len(problems))), by_longest)}")
    return accuracy


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Answer n_per_op held-out problems of each operation; print the report; return accuracy per op."""
    rt = setup_runtime(cfg.device, cfg.dtype, sdpa_backend=cfg.sdpa_backend)
    try:
        model, calc = solver.load_calculator(cfg.checkpoint_path())
        model = model.to(rt.device).eval()
        problems = [p for op in gen.OPS for p in solver.held_out_problems(calc, op, cfg.n_per_op, cfg.seed)]
        solutions = solver.solve(model, calc, problems, rt, cfg.batch_size)
        right = np.array([s.answer == gen.answer(*p) for s, p in zip(solutions, problems, strict=True)])
        accuracy = report(calc, problems, right)
        print("exact-match accuracy: " + " ".join(f"{op}{accuracy[op]:.4f}" for op in gen.OPS))
        return accuracy
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        evaluate(load_config(EvalConfig, argv))


if __name__ == "__main__":
    main()
