"""Datasets generated on the fly (gptsmith.generated): pure batches, held-out problems, masking,
exact resume, two processes as one, and one-line errors for broken generators."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import generated
from gptsmith.config import SampleConfig, TrainConfig
from gptsmith.configurator import UserError
from gptsmith.init_from import Start
from gptsmith.sampler import sample
from gptsmith.trainer import open_generated, train
from helpers import ROOT, TINY, load_script, read_metrics

REVERSE = ROOT / "data" / "reverse" / "generate.py"
SHIPPED = ("calculator", "reverse")


def tiny_run(tmp_path, name):
    """A tiny run on a shipped generator; only sizes pinned, as in tests/helpers.TINY (block_size is
    the generator's)."""
    block_size = generated.load_generator(ROOT / "data" / name / "generate.py", name).block_size

    def make(**overrides):
        base = {**TINY, "block_size": block_size, "eval_iters": 2, "out_dir": str(tmp_path / "out")}
        return TrainConfig(dataset=str(ROOT / "data" / name), **{**base, **overrides})

    return make


@pytest.fixture
def reverse_cfg(tmp_path):
    return tiny_run(tmp_path, "reverse")


@pytest.fixture(params=SHIPPED)
def shipped_cfg(tmp_path, request):
    """Each shipped generator in turn: resume and two processes behave alike on every one."""
    return tiny_run(tmp_path, request.param)


def batches(cfg: TrainConfig, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch training takes at (step, micro-step)."""
    data = open_generated(cfg, Start(cfg=cfg), Path(cfg.dataset) / "generate.py")
    rows, _ = data.steps.micro_batch(step, micro)
    return torch.from_numpy(rows[0]), torch.from_numpy(rows[1])


def test_a_batch_is_a_pure_function_of_seed_step_and_micro_step(shipped_cfg):
    cfg = shipped_cfg(gradient_accumulation_steps=2)
    x, y = batches(cfg, 5, 1)
    x2, y2 = batches(cfg, 5, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, batches(cfg, 6, 1)[0]) and not torch.equal(x, batches(cfg, 5, 0)[0])
    assert not torch.equal(x, batches(dataclasses.replace(cfg, seed=7), 5, 1)[0])
    assert x.shape == y.shape and x.shape[0] == cfg.batch_size and x.shape[1] <= cfg.block_size


def unpadded(rows: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each row of a (2, B, L) batch as (tokens, targets) without its padding."""
    out = []
    for tokens, targets in zip(*rows):
        n = int(np.flatnonzero(targets != -1).max()) + 1  # an example's last token always has a target
        out.append((tuple(tokens[:n]), tuple(targets[:n])))
    return out


@pytest.mark.parametrize("trim", [True, False])
def test_a_step_is_its_rows_sorted_by_length_into_micro_batches_each_padded_to_its_own_longest(trim, tmp_path):
    """The micro-batches of a step hold exactly the examples the sampler drew for it, longest first,
    each as wide as its longest row (trim; else block_size, for a compiled model)."""
    cfg = tiny_run(tmp_path, "calculator")(gradient_accumulation_steps=4, batch_size=8)
    data = open_generated(cfg, Start(cfg=cfg), Path(cfg.dataset) / "generate.py")
    assert data.steps.trim  # compile=False: trimmed
    steps = generated.SortedSteps(data.splits["train"], data.sampler, trim=trim)
    drawn = [row for m in range(4) for row in unpadded(data.splits["train"].rows(data.sampler.offsets(3, m)))]
    micro = [steps.micro_batch(3, m) for m in range(4)]
    rows = [row for batch, _ in micro for row in unpadded(batch)]
    assert sorted(rows) == sorted(drawn) and len({len(t) for t, _ in rows}) > 2  # lengths do differ
    assert [len(t) for t, _ in rows] == sorted((len(t) for t, _ in rows), reverse=True)
    for batch, share in micro:
        assert batch.shape[1] == 8
        assert batch.shape[2] == (len(unpadded(batch)[0][0]) if trim else cfg.block_size)
        assert share == pytest.approx((batch[1] != -1).sum() / sum(len([t for t in tg if t != -1]) for _, tg in rows))
    assert sum(share for _, share in micro) == pytest.approx(1.0)
    assert (steps.share_computed() < 0.8) == trim and steps.share_computed() <= 1.0  # MFU counts computed tokens


def test_a_step_learns_the_same_however_its_rows_are_split_into_micro_batches(tmp_path):
    """64 rows as 1 micro-batch or as 4 sorted ones of 16: the same examples, and the same step,
    since each micro-batch weighs by its share of the step's targets, not a quarter each."""
    make = tiny_run(tmp_path, "calculator")
    kw = dict(max_iters=3, lr_decay_iters=3, eval_interval=3)
    one = make(out_dir=str(tmp_path / "one"), batch_size=16, gradient_accumulation_steps=1, **kw)
    four = make(out_dir=str(tmp_path / "four"), batch_size=4, gradient_accumulation_steps=4, **kw)
    train(one)
    train(four)
    losses = [[r["loss"] for r in read_metrics(c.out_dir)[0]] for c in (one, four)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    pa = ckpt_io.load_checkpoint(Path(one.out_dir) / "ckpt.pt")["model"]
    pb = ckpt_io.load_checkpoint(Path(four.out_dir) / "ckpt.pt")["model"]
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-6)


def test_only_the_answer_is_a_target_and_padding_is_masked():
    module = generated.load_generator(REVERSE, "reverse")
    split = generated.GeneratedSplit(module, "train", REVERSE)
    rows = split.rows(np.arange(50))
    itos = module.meta["itos"]
    for tokens, targets in zip(*rows):
        text = "".join(itos[t] for t in tokens)
        digits = text.split(">")[0]
        answer = [itos[t] for t in targets if t != -1]
        assert "".join(answer) == digits[::-1] + "."  # the reversed digits and the end, nothing else
        assert (targets[: len(digits)] == -1).all()  # no target on the random digits


def test_held_out_problems_never_reach_training():
    module = generated.load_generator(REVERSE, "reverse")
    train_split = generated.GeneratedSplit(module, "train", REVERSE)
    val_split = generated.GeneratedSplit(module, "val", REVERSE)

    def problems(split, n):
        return {generated.prompt(*split.example(key)) for key in range(n)}

    seen, held = problems(train_split, 3000), problems(val_split, 300)
    assert not seen & held
    assert all(generated.is_held_out(p, 0.05) for p in held)
    assert not any(generated.is_held_out(p, 0.05) for p in seen)
    # The hash split holds out about val_share of the problems, whatever draws them.
    share = np.mean([generated.is_held_out(str(i), 0.05) for i in range(20000)])
    assert 0.04 < share < 0.06


def test_resume_on_generated_data_is_bit_exact(shipped_cfg, tmp_path):
    kw = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, gradient_accumulation_steps=2, dropout=0.1)
    straight = shipped_cfg(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)
    split = shipped_cfg(out_dir=str(tmp_path / "split"), **{**kw, "max_iters": 4})
    train(split)
    train(dataclasses.replace(split, max_iters=8, init_from="resume"), {"max_iters", "init_from"})
    a = ckpt_io.load_checkpoint(Path(straight.out_dir) / "ckpt.pt")["model"]
    b = ckpt_io.load_checkpoint(Path(split.out_dir) / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_on_generated_data_as_one(shipped_cfg, tmp_path):
    """2 gloo processes x 1 micro-step draw exactly the examples of 1 process x 2 micro-steps."""
    single = shipped_cfg(out_dir=str(tmp_path / "one"), max_iters=5, lr_decay_iters=5, eval_interval=5,
                         gradient_accumulation_steps=2)  # fmt: skip
    train(single)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(single).items() if k != "out_dir"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--backend=gloo", *args, f"--out_dir={tmp_path / 'two'}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(single.out_dir)[0], read_metrics(tmp_path / "two")[0]
    assert [b["loss"] == pytest.approx(a["loss"], rel=1e-5) for a, b in zip(one, two)] == [True] * 5
    pa = ckpt_io.load_checkpoint(Path(single.out_dir) / "ckpt.pt")["model"]
    pb = ckpt_io.load_checkpoint(tmp_path / "two" / "ckpt.pt")["model"]
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6)


def test_the_shipped_generator_trains_and_its_model_samples(reverse_cfg, capsys):
    cfg = reverse_cfg(max_iters=2, eval_interval=2)
    summary = train(cfg)
    assert summary["iter"] == 2
    assert "data: generated by" in capsys.readouterr().out
    # The checkpoint records the generator's vocabulary: sampling needs no dataset folder.
    out = sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", start="123>", num_samples=1, max_new_tokens=4))
    assert out[0].startswith("123>") and len(out[0]) == 8


def write_generator(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate.py").write_text(body)
    return folder


GOOD = textwrap.dedent("""
    meta = {"vocab_size": 3, "stoi": {"a": 0, "b": 1, "=": 2}, "itos": {0: "a", 1: "b", 2: "="}}
    block_size = 4
    def example(rng):
        return [0, 2, 1, 1], [-1, 1, 1, -1]
""")


@pytest.mark.parametrize(
    "body,overrides,message",
    [
        ("block_size = 4\ndef example(rng): return [0], [0]\n", {}, "must define meta"),
        (GOOD.replace("def example(rng):", "def other(rng):"), {}, "must define example"),
        (GOOD + "\nraise RuntimeError('boom')\n", {}, "failed to load: RuntimeError: boom"),
        (GOOD, {"block_size": 8}, "set --block_size=4"),
        (GOOD, {"eval_iters": 0}, "set eval_iters > 0"),
        (GOOD, {"sampler": "epoch"}, "use sampler='random'"),
        (GOOD.replace("[-1, 1, 1, -1]", "[-1, 7, 1, -1]"), {}, "outside 0..2"),
        (GOOD.replace("[-1, 1, 1, -1]", "[-1, 1]"), {}, "as many"),
        (GOOD.replace("[-1, 1, 1, -1]", "[-1, -1, -1, -1]"), {}, "no target"),
    ],
)
def test_a_broken_generator_or_setting_is_one_error_line(tmp_path, body, overrides, message):
    folder = write_generator(tmp_path / "gen", body)
    cfg = TrainConfig(dataset=str(folder), out_dir=str(tmp_path / "out"), **{**TINY, "block_size": 4, **overrides})
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_token_files_win_over_a_generator(tmp_path, char_data):
    """A folder with train.bin is a token dataset even if it also holds a generate.py."""
    folder = tmp_path / "both"
    folder.mkdir()
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (folder / name).write_bytes((char_data / name).read_bytes())
    write_generator(folder, GOOD)
    assert generated.generator_path(folder) is None
    assert generated.generator_path(write_generator(tmp_path / "only", GOOD)) is not None


def test_the_generated_readme_example_is_the_shipped_one():
    """README shows data/reverse/generate.py's example(); keep them the same."""
    readme = (ROOT / "README.md").read_text()
    source = REVERSE.read_text()
    start = source.index("def example(")
    assert source[start:].strip() in readme
    load_script("data/reverse/generate.py")  # and it imports on its own
