"""data/calculator: its traces work the answer out, what is a target, held-out problems, and
calc.py's parsing, step-by-step evaluation and one-line errors; evaluate.py's report."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptsmith import generated
from gptsmith.config import TrainConfig
from gptsmith.configurator import UserError, load_config
from gptsmith.trainer import train
from helpers import ROOT, TINY, load_script

FOLDER = ROOT / "data" / "calculator"
sys.path.insert(0, str(FOLDER))  # calc.py and evaluate.py import generate and solver from beside them
import generate as gen  # noqa: E402
import solver  # noqa: E402

calc = load_script("data/calculator/calc.py")
evaluate = load_script("data/calculator/evaluate.py")


def unrev(s: str) -> int:
    """The number whose digits, least significant first, are s."""
    return int(s[::-1])


def signed(digits: str, sign: str) -> int:
    return unrev(digits) - (10 ** len(digits) if sign == "-" else 0)


def check_times_digit(chunk: str, a: int, d: int) -> None:
    """2 * width tokens of a x d: a digit of the product and the carry on, per digit of a."""
    carry = 0
    for k in range(len(chunk) // 2):
        t = a // 10**k % 10 * d + carry
        assert (int(chunk[2 * k]), int(chunk[2 * k + 1])) == (t % 10, t // 10)
        carry = t // 10
    assert unrev(chunk[0::2] + chunk[-1]) == a * d


def check_trace(c, a: int, op: str, b: int, text: str) -> None:
    """Read the trace as generate.py's docstring says and check every number in it; then the answer."""
    w = c.width
    prompt, rest = text[: 2 * w + 2], text[2 * w + 2 :]
    assert prompt == f"{a:0{w}d}{op}{b:0{w}d}=" and rest.endswith(".")
    trace, _, answer = rest[:-1].partition(">")
    assert len(trace) == c.trace_len[op]
    if op == "+":
        assert unrev(trace) == a + b
    elif op == "-":
        assert signed(trace[:w], trace[w]) == a - b and signed(trace[w + 1 : 2 * w + 1], trace[2 * w + 1]) == b - a
    elif op == "*":
        for j in range(w):
            check_times_digit(trace[2 * w * j : 2 * w * (j + 1)], a, b // 10**j % 10)
        at = 2 * w * w
        for j in range(1, w):  # the running sums, each one digit longer
            assert unrev(trace[at : at + w + j + 1]) == a * (b % 10 ** (j + 1))
            at += w + j + 1
    else:
        rem, quotient, n = 0, "", c.step_len
        for k in range(w):
            s = trace[n * k : n * (k + 1)]
            r, g = unrev(s[: w + 1]), int(s[w + 1])
            assert r == 10 * rem + int(f"{a:0{w}d}"[k])
            check_times_digit(s[w + 2 : 3 * w + 2], b, g)
            d = signed(s[3 * w + 2 : 4 * w + 3], s[4 * w + 3])
            x = signed(s[4 * w + 4 : 5 * w + 5], s[5 * w + 5])
            assert d == r - g * b and x == d - b
            q = int(s[5 * w + 6])
            assert q == g - (d < 0) + (x >= 0)  # the correction the signs call for
            check_times_digit(s[5 * w + 7 : 7 * w + 7], b, q)
            rem = unrev(s[7 * w + 7 :])  # the step's digit and remainder are right
            assert len(s[7 * w + 7 :]) == w and rem == r - q * b and 0 <= rem < b
            quotient += str(q)
        assert int(quotient) == a // b and rem == a % b
    want = {"+": a + b, "-": a - b, "*": a * b}.get(op)
    assert answer == (str(want) if op != "/" else f"{a // b} r {a % b}")


C = gen.CALCULATOR  # 3 digits
EDGES = [(0, 0), (999, 999), (999, 1), (1, 999), (500, 500), (100, 1), (7, 3), (0, 5), (10, 10), (998, 999)]


@pytest.mark.parametrize("width", [3, 4])
@pytest.mark.parametrize("op", gen.OPS)
def test_every_trace_works_out_the_answer(op, width):
    c = gen.Calculator(width)
    rng = np.random.default_rng(0)
    top = c.max_operand
    edges = [(x * top // 999, y * top // 999) for x, y in EDGES]
    for a, b in edges + [(c.operand(rng), c.operand(rng)) for _ in range(2000)]:
        if op == "/" and b == 0:
            continue
        check_trace(c, a, op, b, c.text(a, op, b))
        if op == "/":  # a guess one off is corrected within its step
            check_trace(c, a, op, b, c.text(a, op, b, c.wrong_guesses(rng, a, b)))
            q = [a // b // 10 ** (width - 1 - k) % 10 for k in range(width)]
            for off in (1, -1):  # every guess one off at once, where the other way is possible
                check_trace(c, a, op, b, c.text(a, op, b, [off if 0 <= d + off <= 9 else 0 for d in q]))


def test_the_documented_examples_are_what_the_generator_writes():
    """generate.py's docstring and README's table show whole examples: each is the generator's."""
    docs = gen.__doc__ + (ROOT / "README.md").read_text()
    shown = {m.replace(" ", "") for m in re.findall(r"\b(\d{3}[-+*/]\d{3}=[0-9+\- ]+>-?\d+(?: r \d+)?\.)", docs)}
    assert len(shown) >= 4  # + - * from each, at least
    for example in shown:
        a, op, b = int(example[:3]), example[3], int(example[4:7])
        assert example == gen.CALCULATOR.text(a, op, b).replace(" ", ""), example


@pytest.mark.parametrize(
    "overlay, dataset, width",
    [(None, "calculator", 3), ("calculator4", "calculator4", 4), ("calculator_beyond", "calculator_beyond", 4)],
)
def test_the_shipped_configs_fit_their_generators_longest_example(overlay, dataset, width):
    files = ["config/calculator.py"] + ([f"config/{overlay}.py"] if overlay else [])
    cfg = load_config(TrainConfig, [str(ROOT / f) for f in files])
    module = generated.load_generator(ROOT / "data" / dataset / "generate.py", dataset)
    assert cfg.dataset == dataset and cfg.block_size == module.block_size == gen.Calculator(width).block_size
    assert module.CALCULATOR.width == module.meta["calculator_width"] == width


def test_beyond_the_trained_range_training_never_draws_a_4_digit_operand_evaluation_does():
    """data/calculator_beyond: the 4-digit layout, trained on 0..999 with the 3-digit recipe's
    length chances; evaluation poses every length up to 4 and marks the untrained one."""
    module = generated.load_generator(ROOT / "data" / "calculator_beyond" / "generate.py", "calculator_beyond")
    c = module.CALCULATOR
    assert (c.width, c.train_width, module.meta["calculator_train_width"]) == (4, 3, 3)
    rng = np.random.default_rng(3)
    draws = [c.draw(rng) for _ in range(20000)]
    assert max(len(str(x)) for a, _, b in draws for x in (a, b)) == 3
    lengths = np.bincount([len(str(a)) for a, _, _ in draws])[1:] / len(draws)
    assert np.allclose(lengths, [1 / 6, 2 / 6, 3 / 6], atol=0.02)  # as data/calculator trains
    for _ in range(300):  # what training sees: the prompt's leading digits are always 0
        tokens, _ = c.example(rng)
        prompt = "".join(gen.meta["itos"][t] for t in tokens[: c.prompt_len])
        assert prompt[0] == prompt[5] == "0" and len(prompt) == 10
    tested = solver.held_out_problems(c, "*", 400, seed=0)
    assert {max(len(str(a)), len(str(b))) for a, _, b in tested} == {1, 2, 3, 4}
    assert evaluate.longest(c, 1234, 5) == "4 (beyond training)" and evaluate.longest(c, 123, 5) == "3"
    assert evaluate.longest(gen.Calculator(4), 1234, 5) == "4"


def test_only_trace_and_answer_are_targets_never_a_wrong_guess():
    """Masked guesses are exactly the wrong ones, one off; WRONG_GUESS of the steps have one, and
    where the guess could go either way it goes high with chance HIGH_GUESS (more than half)."""
    rng = np.random.default_rng(1)
    itos, seen_wrong, steps, either_way = gen.meta["itos"], 0, 0, {1: 0, -1: 0}
    for _ in range(3000):
        tokens, targets = C.example(rng)
        text = "".join(itos[t] for t in tokens) + itos[targets[-1]]
        assert len(tokens) == len(targets) <= gen.block_size
        assert targets[:7] == [-1] * 7  # nothing to learn in the operands
        op, trace = text[3], text[8:]
        masked = [i for i, t in enumerate(targets[7:]) if t == -1]  # trace tokens that are not targets
        if op != "/":
            assert not masked
            continue
        for i in masked:  # only a guess, and only one that is off
            step, at = divmod(i, C.step_len)
            assert at == 4
            r, g = unrev(trace[C.step_len * step :][:4]), int(trace[C.step_len * step + 4])
            b = int(text[4:7])
            assert abs(g - r // b) == 1
            seen_wrong += 1
            if 1 <= r // b <= 8:
                either_way[g - r // b] += 1
        steps += 3
        for k in set(range(3)) - {i // C.step_len for i in masked}:  # every other guess is as aimed, a target
            r, g = unrev(trace[C.step_len * k :][:4]), int(trace[C.step_len * k + 4])
            assert g == r // int(text[4:7])
    assert seen_wrong > 100 and abs(seen_wrong / steps - gen.WRONG_GUESS) < 0.04
    assert gen.HIGH_GUESS > 0.5 and sum(either_way.values()) > 100
    assert abs(either_way[1] / sum(either_way.values()) - gen.HIGH_GUESS) < 0.06


def test_training_favours_long_operands_evaluation_takes_every_length_alike_and_every_op_comes():
    rng = np.random.default_rng(2)
    draws = [C.draw(rng) for _ in range(20000)]
    lengths = np.bincount([len(str(a)) for a, _, _ in draws])[1:] / len(draws)
    assert np.allclose(lengths, [1 / 6, 2 / 6, 3 / 6], atol=0.02)  # k digits with chance proportional to k
    shares = {op: sum(d[1] == op for d in draws) / len(draws) for op in gen.OPS}
    assert all(abs(shares[op] - gen.OP_SHARE[op]) < 0.02 for op in gen.OPS)
    assert all(d[2] >= 1 for d in draws if d[1] == "/")
    divisors = [len(str(b)) for _, op, b in draws if op == "/"]
    assert np.allclose(np.bincount(divisors)[1:] / len(divisors), [0.3, 0.5, 0.2], atol=0.025)  # mostly 2 digits
    tested = solver.held_out_problems(C, "/", 2000, seed=0)  # distinct: few have two short operands
    pairs = {(len(str(a)), len(str(b))) for a, _, b in tested}
    assert len(set(tested)) == 2000 and pairs == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)}
    assert all(b >= 1 for _, _, b in tested)


def test_evaluation_problems_are_held_out_and_never_trained_on():
    module = generated.load_generator(FOLDER / "generate.py", "calculator")
    train_split = generated.GeneratedSplit(module, "train", FOLDER / "generate.py")
    trained = set()
    for key in range(20000):
        tokens, _ = train_split.example(key)
        trained.add("".join(gen.meta["itos"][t] for t in tokens[:8]))
    for op in gen.OPS:
        problems = solver.held_out_problems(C, op, 300, seed=1234)
        assert len(set(problems)) == 300 and all(p[1] == op for p in problems)
        prompts = {C.prompt(*p) for p in problems}
        assert not prompts & trained
        assert all(generated.is_held_out(np.asarray(gen.encode(p), np.int64).tobytes(), gen.val_share) for p in prompts)


@pytest.fixture(scope="module")
def tiny_calculator(tmp_path_factory):
    """A checkpoint of 2 steps on data/calculator: the answers are wrong, but it is a calculator's."""
    out = tmp_path_factory.mktemp("calculator")
    kw = {**TINY, "block_size": gen.block_size, "eval_iters": 2, "max_iters": 2, "eval_interval": 2}
    train(TrainConfig(dataset=str(FOLDER), **{**kw, "out_dir": str(out)}))
    return str(out)


# calc.py


@pytest.mark.parametrize(
    "text, tree",
    [
        ("12*(34+5)-6", ("-", ("*", 12, ("+", 34, 5)), 6)),
        ("1-2-3", ("-", ("-", 1, 2), 3)),  # left to right
        ("2*3+4*5", ("+", ("*", 2, 3), ("*", 4, 5))),  # * before +
        ("100/7/2", ("/", ("/", 100, 7), 2)),
        (" ((7)) ", 7),
        ("007 + 8", ("+", 7, 8)),
    ],
)
def test_calc_parses_with_the_usual_precedence(text, tree):
    assert calc.parse(text) == tree


def oracle(model, c, problems, rt, batch_size=500):
    """What a perfect model writes: the generator's trace and answer."""
    oracle.calls += 1
    return [solver.Solution(c.prompt(*p), c.text(*p)[len(c.prompt(*p)) :]) for p in problems]


@pytest.fixture
def perfect_model(monkeypatch):
    oracle.calls = 0
    monkeypatch.setattr(solver, "solve", oracle)
    return oracle


def test_calc_works_an_expression_out_step_by_step_batching_across_expressions(perfect_model):
    evs = calc.calculate(None, C, ["12*(34+5)-6", "17/5", "999*999", "123-456", "1+2*3", "42"], None)
    assert [e.answer for e in evs] == ["462", "3 r 2", "998001", "-333", "7", "42"]
    assert [len(e.traces) for e in evs] == [3, 1, 1, 1, 2, 0]
    assert evs[0].traces[0].startswith("034+005=") and evs[0].traces[-1].startswith("468-006=")
    assert perfect_model.calls == 3  # one batch per level of the deepest tree, not one per step


@pytest.mark.parametrize(
    "text, message",
    [
        ("999*2+1", "1998, is outside 0..999"),
        ("10-20+5", "-10, is outside 0..999"),
        ("7/2+1", "7/2 leaves a remainder (3 r 1)"),
        ("5/(3-3)", "division by zero (5/0)"),
    ],
)
def test_calc_stops_where_an_intermediate_cannot_go_on(perfect_model, text, message):
    ev = calc.calculate(None, C, [text, "1+1"], None)
    assert message in ev[0].error and ev[1].answer == "2"  # the other expression is still answered


@pytest.mark.parametrize(
    "args, message",
    [
        (["2^3"], "unexpected '^'"),
        (["1.5+2"], "1.5 is not a whole number"),
        (["1000+1"], "1000 is outside 0..999"),
        (["5/0"], "division by zero"),
        (["(1+2"], "'(' is not closed"),
        (["1+"], "ends where a number"),
        (["-5+3"], "negative numbers"),
        (["1+2", "abc"], "unexpected 'a'"),
        (["1+2", "--show_trace=maybe"], "show_trace"),
        (["1+2", "--out_dir=/nonexistent"], "/nonexistent"),
    ],
)
def test_calc_bad_input_is_one_error_line(tiny_calculator, args, message):
    cmd = [sys.executable, "data/calculator/calc.py", f"--out_dir={tiny_calculator}", "--device=cpu", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_calc_reads_expressions_from_stdin_and_refuses_none():
    r = subprocess.run(
        [sys.executable, "data/calculator/calc.py"], cwd=ROOT, input="\n  \n", capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.startswith("error: no expression given")


def test_calc_and_evaluate_run_a_trained_checkpoint(tiny_calculator, perfect_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", type("In", (), {"read": lambda self: "17/5\n\n12*(34+5)-6\n"})())
    calc.main([f"--out_dir={tiny_calculator}", "--device=cpu", "--show_trace=True"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"  {C.text(17, '/', 5)}", "3 r 2", *(f"  {C.text(*p)}" for p in
                     [(34, "+", 5), (12, "*", 39), (468, "-", 6)]), "462"]  # fmt: skip
    evaluate.main([f"--out_dir={tiny_calculator}", "--device=cpu", "--n_per_op=40"])
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "exact-match accuracy: +1.0000 -1.0000 *1.0000 /1.0000"
    assert "digits: 1+1:" in out and "carries" in out and "borrows" in out and "quotient" in out


def test_evaluate_decodes_with_the_real_model_and_reports_every_op(tiny_calculator, capsys):
    """The untrained model's answers are wrong, but every problem is decoded and scored."""
    acc = evaluate.evaluate(evaluate.EvalConfig(out_dir=tiny_calculator, device="cpu", n_per_op=30, batch_size=16))
    assert set(acc) == set(gen.OPS) and all(0 <= v <= 1 for v in acc.values())
    lines = capsys.readouterr().out.splitlines()
    last = lines[-1]
    assert re.match(r"all ops by the longest operand: 1: \d\.\d{4} \(\d+\)  2: .*  3: ", lines[-2])
    assert re.fullmatch(r"exact-match accuracy: \+\d\.\d{4} -\d\.\d{4} \*\d\.\d{4} /\d\.\d{4}", last)


def test_the_checkpoint_says_its_width_and_another_dataset_is_refused(tmp_path, tiny_calculator):
    assert solver.load_calculator(Path(tiny_calculator) / "ckpt.pt")[1].width == 3
    width4 = gen.Calculator(4).block_size
    wide = TrainConfig(dataset=str(ROOT / "data" / "calculator4"), **{**TINY, "block_size": width4, "max_iters": 1,
                       "eval_iters": 1, "out_dir": str(tmp_path / "c4")})  # fmt: skip
    train(wide)
    model, c = solver.load_calculator(Path(wide.out_dir) / "ckpt.pt")
    assert c.width == c.train_width == 4 and c.block_size == model.config.block_size == width4
    beyond = replace(wide, dataset=str(ROOT / "data" / "calculator_beyond"), out_dir=str(tmp_path / "beyond"))
    train(beyond)
    narrow = solver.load_calculator(Path(beyond.out_dir) / "ckpt.pt")[1]
    assert (narrow.width, narrow.train_width) == (4, 3)
    calc.Evaluation("1234+1", c)  # the 4-digit model takes it; the one trained on 0..999 does not
    with pytest.raises(UserError, match=r"1234 is outside 0\.\.999, the range the model was trained on"):
        calc.Evaluation("1234+1", narrow)
    other = TrainConfig(dataset=str(ROOT / "data" / "reverse"), **{**TINY, "block_size": 17, "max_iters": 1,
                        "eval_iters": 1, "out_dir": str(tmp_path / "rev")})  # fmt: skip
    train(other)
    with pytest.raises(UserError, match="not trained on data/calculator"):
        solver.load_calculator(Path(other.out_dir) / "ckpt.pt")


def test_solutions_read_the_answer_between_the_marker_and_the_end():
    assert solver.Solution("017/005=", "xyz>3 r 2.").answer == "3 r 2"
    assert solver.Solution("017/005=", "xyz>3 r 2").answer == ""  # never finished
    assert solver.Solution("017/005=", "xyz3 r 2.").answer == ""
    assert solver.decode_until_end(gen.encode("12>3.45")) == "12>3."
    assert Path(solver.__file__).parent == FOLDER
