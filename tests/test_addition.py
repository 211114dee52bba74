"""Teaching it arithmetic (issue 7): data/addition, datasets with their own targets, evaluation,
and starting a new run from another run's checkpoint (init_from=PATH)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptsmith import checkpoint as ckpt_io
from gptsmith import data as ds
from gptsmith import init_from
from gptsmith import trainer as train_module
from gptsmith.configurator import UserError
from gptsmith.model import GPT, GPTConfig, masked_cross_entropy
from gptsmith.optim import get_lr
from gptsmith.runtime import setup_runtime
from gptsmith.trainer import train
from helpers import ROOT, load_script

DIGITS = 2  # 10,000 problems of 10 tokens: quick to prepare and to learn
LENGTH = 3 * DIGITS + 4


@pytest.fixture(scope="session")
def prepare_script():
    return load_script("data/addition/prepare.py")


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory: pytest.TempPathFactory, prepare_script) -> Path:
    """2-digit problems: 300 test, 200 val, the other 9,500 train."""
    out = tmp_path_factory.mktemp("addition")
    prepare_script.main([f"--digits={DIGITS}", "--n_test=300", "--n_val=200", f"--out_dir={out}"])
    return out


def read_examples(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of a split, one example per row."""
    tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16).reshape(-1, LENGTH)
    targets = np.fromfile(folder / f"{split}.targets.bin", dtype=np.int16).reshape(-1, LENGTH)
    return tokens, targets


def problems(folder: Path, split: str) -> list[tuple[int, int]]:
    """The (a, b) of every example of a split, read back from its tokens."""
    itos = pickle.loads((folder / "meta.pkl").read_bytes())["itos"]
    rows = read_examples(folder, split)[0][:, : 2 * DIGITS + 1]
    return [tuple(int(x) for x in "".join(itos[int(i)] for i in row).split("+")) for row in rows]


def addition_cfg(tiny_cfg, data: Path, **overrides):
    """A tiny model for the 10-token addition examples."""
    return tiny_cfg(**{"dataset": str(data), "block_size": LENGTH, "batch_size": 32, **overrides})


# --- the data ----------------------------------------------------------------------------------


def test_prepare_round_trips(addition_data):
    meta = pickle.loads((addition_data / "meta.pkl").read_bytes())
    assert meta["example_len"] == LENGTH and meta["targets_dtype"] == "int16" and meta["vocab_size"] == 14
    assert set(meta["stoi"]) == set("0123456789+=$.")
    start = meta["prompt_len"]
    for split in ("train", "val", "test"):
        tokens, targets = read_examples(addition_data, split)
        for row, target in zip(tokens[:300], targets[:300]):
            text = "".join(meta["itos"][int(i)] for i in row)
            a, b = int(text[:DIGITS]), int(text[DIGITS + 1 : 2 * DIGITS + 1])
            answer = str(a + b)[::-1] + "$"  # least significant digit first
            assert text == f"{a:0{DIGITS}d}+{b:0{DIGITS}d}=" + answer.ljust(LENGTH - start, ".")
            # Only the answer and its end marker are targets: each the token after its position.
            learned = np.flatnonzero(target != -1)
            assert list(learned) == list(range(start - 1, start - 1 + len(answer)))
            assert list(target[learned]) == list(row[learned + 1])


def test_problem_sets_are_disjoint(addition_data):
    train_set, val_set, test_set = (problems(addition_data, s) for s in ("train", "val", "test"))
    assert (len(train_set), len(val_set), len(test_set)) == (9_500, 200, 300)
    everything = train_set + val_set + test_set
    assert len(set(everything)) == len(everything) == 10**DIGITS * 10**DIGITS  # every ordered pair exactly once
    assert not set(test_set) & set(train_set) and not set(val_set) & set(train_set)


def test_prepare_refuses_too_many_problems(tmp_path, prepare_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_script.main(["--digits=1", "--n_test=90", "--n_val=20", f"--out_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "only 100 problems" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_masked_positions_contribute_nothing(addition_data):
    """The loss and its gradient are the cross-entropy over the answer positions alone."""
    meta = ds.load_meta(addition_data)
    data = ds.open_split(addition_data, "val", "addition", meta["vocab_size"], meta)
    x, y = ds.get_batch(data, np.arange(8) * LENGTH, LENGTH, "cpu")
    assert torch.equal(x, torch.from_numpy(data.tokens[: 8 * LENGTH].astype(np.int64)).view(8, LENGTH))
    answer = y != -1
    assert 0 < answer.sum() < y.numel() / 2

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=LENGTH, vocab_size=14, n_layer=1, n_head=2, n_embd=16, bias=False))
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x, y)
    manual = F.cross_entropy(logits[answer], y[answer])  # answer positions only
    manual.backward()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    for name, p in model.named_parameters():  # (torch.testing.assert_close takes seconds to import)
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name

    # Masked logits get exactly zero gradient, and whatever targets were there would not matter.
    leaf = logits.detach().requires_grad_()
    masked_cross_entropy(leaf, y).backward()
    assert (leaf.grad[~answer] == 0).all() and (leaf.grad[answer] != 0).any()
    scrambled = torch.where(answer, y, torch.full_like(y, -1))
    assert masked_cross_entropy(logits, scrambled).item() == pytest.approx(loss.item())


def test_example_windows_sampler_and_eval_batches():
    n_examples, length = 50, 7
    sampler = ds.BatchSampler(n_examples * length, length, 5, micro_steps=2, seed=0, example_len=length)
    drawn = np.concatenate([sampler.offsets(s, m) for s in range(20) for m in range(2)])
    assert (drawn % length == 0).all() and drawn.max() <= (n_examples - 1) * length
    epoch = ds.BatchSampler(n_examples * length, length, 5, micro_steps=1, seed=0, mode="epoch", example_len=length)
    first = np.concatenate([epoch.offsets(s, 0) for s in range(10)])  # 50 windows = one epoch
    assert sorted(first) == list(range(0, n_examples * length, length))
    fixed = ds.eval_offsets(n_examples * length, length, 8, eval_iters=3, example_len=length)
    assert fixed.shape == (3, 8) and len(set(fixed.ravel())) == 24 and (fixed % length == 0).all()
    whole = ds.eval_offsets(n_examples * length, length, 8, eval_iters=0, example_len=length)
    assert sorted(whole[whole >= 0]) == list(range(0, n_examples * length, length))


def test_example_length_decides_the_block_size():
    with_targets, shifted = {"example_len": 10, "targets_dtype": "int16"}, {"example_len": 10}
    assert ds.example_length(None, 64, "d") == 0 and ds.example_length({"vocab_size": 5}, 64, "d") == 0
    assert ds.example_length(with_targets, 10, "d") == 10 and ds.example_length(shifted, 9, "d") == 10
    with pytest.raises(UserError, match=r"own targets.*--block_size=10 \(got 9\)"):
        ds.example_length(with_targets, 9, "d")
    with pytest.raises(UserError, match=r"--block_size=9 \(got 10\)"):
        ds.example_length(shifted, 10, "d")
    # Examples without their own targets: one whole example per window, shifted by one.
    data = np.arange(30, dtype=np.uint16)
    x, y = ds.get_batch(data, np.array([10, 20]), 9, "cpu")
    assert x[0].tolist() == list(range(10, 19)) and y[1].tolist() == list(range(21, 30))


# --- damaged datasets with targets ---------------------------------------------------------------


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_meta(folder: Path, **changes) -> None:
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    (folder / "meta.pkl").write_bytes(pickle.dumps({**meta, **changes}))


def set_target(folder: Path, index: int, value: int) -> None:
    targets = np.fromfile(folder / "val.targets.bin", dtype=np.int16)
    targets[index] = value
    targets.tofile(folder / "val.targets.bin")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "train.targets.bin").unlink(), "declares its own targets.*has no"),
        (lambda d: (d / "val.targets.bin").write_bytes(b""), "is empty"),
        (lambda d: (d / "val.targets.bin").write_bytes((d / "val.targets.bin").read_bytes()[:-1]), "odd number"),
        (lambda d: (d / "val.targets.bin").write_bytes((d / "val.targets.bin").read_bytes()[:-20]), "must match"),
        (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2]), "whole number of 10-token"),
        (lambda d: set_target(d, 5, 99), "target 99"),
        (lambda d: (d / "val.targets.bin").write_bytes(np.full(2000, -1, np.int16).tobytes()), "no target to learn"),
        (lambda d: rewrite_meta(d, targets_dtype="float32"), "targets_dtype"),
        (lambda d: rewrite_meta(d, example_len=1), "example_len"),
    ],
    ids=["missing", "empty", "odd-size", "shorter", "partial-example", "out-of-vocab", "all-masked", "dtype", "len"],
)
def test_damaged_targets_are_refused(tiny_cfg, tmp_path, addition_data, damage, message):
    data = copy_dataset(addition_data, tmp_path / "data")
    damage(data)
    cfg = addition_cfg(tiny_cfg, data)
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_block_size_must_fit_the_examples(tiny_cfg, addition_data):
    with pytest.raises(UserError, match=rf"10-token examples.*--block_size={LENGTH} \(got 32\)"):
        train(addition_cfg(tiny_cfg, addition_data, block_size=32))


# --- training and evaluation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def addition_run(tmp_path_factory, addition_data) -> Path:
    """A tiny model trained briefly on the 2-digit problems (about ten seconds on a CPU)."""
    from gptsmith.config import TrainConfig

    out = tmp_path_factory.mktemp("addition_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and on a busy machine lose a lot
    cfg = TrainConfig(
        dataset=str(addition_data),
        out_dir=str(out),
        device="cpu",
        compile=False,
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=LENGTH,
        batch_size=64,
        learning_rate=1e-2,
        min_lr=1e-3,
        beta2=0.99,
        max_iters=300,
        lr_decay_iters=300,
        warmup_iters=20,
        eval_interval=300,
        eval_iters=2,
        log_interval=50,
        plot=False,
        gradient_accumulation_steps=1,
        # A model that has learned something in 300 steps is this fixture's subject: on a CPU with
        # bfloat16 units dtype=auto picks bfloat16 for it, in which it learned later (val 1.11 at
        # step 300 on a Zen 5 EPYC); test_shipped_recipe_learns_addition_with_one_thread covers dtype=auto.
        dtype="float32",
    )
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary["val_loss"] < 1.0
    return out


def test_evaluate_scores_a_trained_model(addition_run, capsys):
    evaluate = load_script("data/addition/evaluate.py")
    solved, total = evaluate.evaluate(evaluate.EvalConfig(out_dir=str(addition_run), device="cpu", batch_size=128))
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"exact-match accuracy: \d\.\d{4} \(\d+/300\)", lines[-1]), lines[-1]
    assert lines[-1] == f"exact-match accuracy: {solved / total:.4f} ({solved}/{total})" and total == 300
    assert solved / total > 0.05  # chance is 1 in hundreds
    breakdown = [re.fullmatch(r"  (\d): \d\.\d{4} \((\d+)/(\d+)\)", line) for line in lines[-4:-1]]
    assert [int(m[1]) for m in breakdown] == [0, 1, 2]  # carries
    assert sum(int(m[2]) for m in breakdown) == solved and sum(int(m[3]) for m in breakdown) == total


def test_greedy_decoding_matches_teacher_forcing(addition_run, addition_data):
    """Exact match under greedy decoding == every answer position's argmax right given the true prefix."""
    evaluate = load_script("data/addition/evaluate.py")
    model, _, _ = evaluate.load_addition_model(evaluate.EvalConfig(out_dir=str(addition_run)))
    tokens, targets = read_examples(addition_data, "test")
    rt = setup_runtime("cpu")
    solved = evaluate.score(model.eval(), tokens, targets, ds.load_meta(addition_data), 100, rt)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64)))
    right = (logits.argmax(-1).numpy() == targets) | (targets == -1)
    assert np.array_equal(solved, right.all(axis=1))


def test_evaluate_errors_are_one_line(tmp_path, addition_run, addition_data, tiny_cfg, capsys):
    evaluate = load_script("data/addition/evaluate.py")
    shakespeare = tiny_cfg(max_iters=1, eval_interval=1, out_dir=str(tmp_path / "chars"))
    train(shakespeare)
    no_test = copy_dataset(addition_data, tmp_path / "no_test")
    (no_test / "test.bin").unlink()
    cases = [
        ([f"--out_dir={tmp_path / 'nothing'}"], "no checkpoint"),
        ([f"--out_dir={shakespeare.out_dir}"], "not trained on addition"),
        ([f"--out_dir={addition_run}", f"--dataset={no_test}"], "has no .*test.bin"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*argv, "--device=cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err


# --- init_from another run's checkpoint ----------------------------------------------------------


@pytest.fixture
def source_run(tiny_cfg, tmp_path):
    """A finished tiny character-level run to start from."""
    cfg = tiny_cfg(out_dir=str(tmp_path / "source"), max_iters=10, lr_decay_iters=10, eval_interval=10)
    train(cfg)
    return cfg


def read_records(out_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_init_from_checkpoint_starts_a_fresh_run(tiny_cfg, tmp_path, source_run):
    source_ckpt = Path(source_run.out_dir) / "ckpt.pt"
    before = source_ckpt.read_bytes()
    cfg = tiny_cfg(
        init_from=str(source_ckpt),
        out_dir=str(tmp_path / "finetune"),
        max_iters=4,
        lr_decay_iters=4,
        eval_interval=4,
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=2,
    )

    _, model = init_from._pretrained_state(cfg, set())
    weights = ckpt_io.load_checkpoint(source_ckpt)["model"]
    assert all(torch.equal(p, weights[k]) for k, p in model.state_dict().items())  # the weights at step 0

    train(cfg, explicit={"init_from", "out_dir", "learning_rate"})
    records = read_records(cfg.out_dir)
    evals, logs = [r for r in records if "val_loss" in r], [r for r in records if "loss" in r]
    source_evals = [r for r in read_records(source_run.out_dir) if "val_loss" in r]
    assert evals[0]["iter"] == 0 and evals[0]["val_loss"] == pytest.approx(source_evals[-1]["val_loss"], rel=1e-6)
    assert [r["iter"] for r in logs] == [1, 2, 3, 4]  # a step count of its own
    assert evals[0]["lr"] == pytest.approx(get_lr(0, cfg)) == pytest.approx(1e-3 / 3)  # its own warmup
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert state["iter_num"] == 4 and state["config"]["learning_rate"] == 1e-3
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {4}  # a fresh optimizer: Adam has taken this run's 4 steps, not 10 + 4
    assert source_ckpt.read_bytes() == before


def test_init_from_an_out_dir_and_its_checks(tiny_cfg, tmp_path, source_run):
    out = str(tmp_path / "finetune")
    summary = train(tiny_cfg(init_from=source_run.out_dir, out_dir=out, max_iters=2, eval_interval=2))
    assert summary["iter"] == 2
    with pytest.raises(UserError, match="n_layer=3 conflicts"):
        train(tiny_cfg(init_from=source_run.out_dir, out_dir=out, n_layer=3), explicit={"init_from", "n_layer"})
    with pytest.raises(UserError, match="own out_dir.*init_from=resume"):
        train(tiny_cfg(init_from=source_run.out_dir, out_dir=source_run.out_dir))
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text("{}")
    shutil.copy(Path(source_run.out_dir) / "ckpt.pt", hf_like / "ckpt.pt")
    assert init_from.run_checkpoint(str(hf_like)) is None  # a Hugging Face folder, not a run's out_dir
    assert init_from.run_checkpoint(source_run.out_dir) == Path(source_run.out_dir) / "ckpt.pt"
    with pytest.raises(UserError, match="no such file or folder"):
        tiny_cfg(init_from=str(tmp_path / "missing" / "ckpt.pt"))


def test_init_from_refuses_another_vocabulary(tiny_cfg, tmp_path, source_run, addition_data, char_data):
    with pytest.raises(UserError, match=r"its own vocabulary of 14.*vocabulary of 65"):
        train(addition_cfg(tiny_cfg, addition_data, init_from=source_run.out_dir, out_dir=str(tmp_path / "a")))
    shuffled = copy_dataset(char_data, tmp_path / "shuffled")
    meta = pickle.loads((shuffled / "meta.pkl").read_bytes())
    chars = list(meta["stoi"])[::-1]  # the same 65 characters, other ids
    rewrite_meta(shuffled, stoi={c: i for i, c in enumerate(chars)}, itos=dict(enumerate(chars)))
    with pytest.raises(UserError, match="not the same characters"):
        train(
            dataclasses.replace(
                source_run, init_from=source_run.out_dir, dataset=str(shuffled), out_dir=str(tmp_path / "b")
            )
        )


@pytest.mark.slow
def test_shipped_recipe_learns_addition_with_one_thread(prepare_script, tmp_path, capsys):
    """config/addition.py as users run it, on the full 3-digit data, with one thread: the setting in
    which AdamW's recipe (0.05 exact match on one machine) had not yet found the carry at step 1000."""
    data = tmp_path / "addition"
    prepare_script.main([f"--out_dir={data}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_module.main(
            [str(ROOT / "config" / "addition.py"), f"--dataset={data}", f"--out_dir={tmp_path / 'out'}", "--plot=False"]
        )
    finally:
        torch.set_num_threads(threads)
    evaluate = load_script("data/addition/evaluate.py")
    solved, total = evaluate.evaluate(evaluate.EvalConfig(out_dir=str(tmp_path / "out"), device="cpu"))
    assert total == 10_000 and solved / total >= 0.99, capsys.readouterr().out[-2000:]
