"""Training end to end on the tiny Shakespeare text: schedule, metrics, checkpoints, resume, errors."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import metrics, optim, runtime
from gptsmith import trainer as train_module
from gptsmith.config import SampleConfig, TrainConfig
from gptsmith.configurator import UserError
from gptsmith.optim import get_lr
from gptsmith.sampler import sample
from gptsmith.trainer import train
from helpers import ROOT, read_metrics

# --- learning-rate schedule ------------------------------------------------------------------


def test_lr_schedule_boundaries():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)  # nonzero at the first step
    assert get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert get_lr(55, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert get_lr(100, cfg) == pytest.approx(1e-4)
    assert get_lr(10_000, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(i, cfg) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert get_lr(0, TrainConfig(learning_rate=2e-4, min_lr=0.0, decay_lr=False)) == 2e-4


def test_lr_schedule_without_warmup():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, lr_decay_iters=10)
    assert get_lr(0, cfg) == pytest.approx(1e-3)
    assert get_lr(10, cfg) == pytest.approx(1e-4)


# --- a tiny run end to end -------------------------------------------------------------------


def test_train_writes_checkpoint_and_metrics(tiny_cfg):
    cfg = tiny_cfg(max_iters=30, lr_decay_iters=30, eval_interval=10)
    summary = train(cfg)
    out = Path(cfg.out_dir)
    logs, evals = read_metrics(out)

    assert summary["iter"] == 30 and [r["iter"] for r in logs] == list(range(1, 31))  # exactly max_iters steps
    assert [r["iter"] for r in evals] == [0, 10, 20, 30]
    assert set(logs[0]) >= {"iter", "loss", "lr", "tokens_per_sec", "mfu"}
    assert set(evals[0]) >= {"iter", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s"}
    assert evals[-1]["tokens_seen"] == 30 * cfg.batch_size * cfg.block_size
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learns
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.3)

    state = ckpt_io.load_checkpoint(out / "ckpt.pt")
    assert state["iter_num"] == 30
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    assert state["model_args"]["vocab_size"] == 65  # from meta.pkl
    assert state["config"]["n_embd"] == 32
    assert state["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals[1:]))
    assert (out / "best.pt").exists()


def test_best_val_loss_never_gets_worse(tiny_cfg):
    # A large learning rate late in training makes val loss go up again: best must not follow it.
    cfg = tiny_cfg(max_iters=40, lr_decay_iters=40, eval_interval=5, learning_rate=0.05, min_lr=0.05, warmup_iters=0)
    train(cfg)
    _, evals = read_metrics(cfg.out_dir)
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    best = min(r["val_loss"] for r in evals[1:])
    assert state["best_val_loss"] == pytest.approx(best)
    best_state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "best.pt")
    assert best_state["best_val_loss"] == pytest.approx(best)
    assert best_state["iter_num"] == next(r["iter"] for r in evals if r["val_loss"] == best)


def test_always_save_checkpoint_false_keeps_best(tiny_cfg):
    cfg = tiny_cfg(max_iters=40, lr_decay_iters=40, eval_interval=5, learning_rate=0.05, min_lr=0.05, warmup_iters=0)
    train(dataclasses_replace(cfg, always_save_checkpoint=False))
    _, evals = read_metrics(cfg.out_dir)
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    best_iter = min(evals[1:], key=lambda r: r["val_loss"])["iter"]
    assert state["iter_num"] == best_iter


def test_val_only_evals_skip_the_start(tiny_cfg, capsys):
    """eval_train=False, eval_at_start=False: no step-0 eval, no train loss, the val loss unchanged."""
    cfg = tiny_cfg(max_iters=20, lr_decay_iters=20, eval_interval=10, eval_iters=0)  # eval_iters=0: whole splits
    both = train(cfg)
    lean_cfg = dataclasses_replace(cfg, out_dir=cfg.out_dir + "-lean", eval_train=False, eval_at_start=False)
    lean = train(lean_cfg)
    _, evals = read_metrics(lean_cfg.out_dir)
    assert [r["iter"] for r in evals] == [10, 20]
    assert all(r["train_loss"] is None for r in evals)
    assert lean["train_loss"] is None and both["train_loss"] is not None
    assert lean["val_loss"] == both["val_loss"]  # the same training stream and the same eval batches
    assert "last: val " in capsys.readouterr().out


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def final_params(out_dir: str | Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(Path(out_dir) / "ckpt.pt")["model"]


@pytest.mark.parametrize("accum,dropout", [(1, 0.0), (2, 0.1)])
def test_resume_is_exact(tiny_cfg, tmp_path, accum, dropout):
    """N+M steps straight == N steps, resume, M steps: same losses, bit-identical weights."""
    kw = dict(gradient_accumulation_steps=accum, dropout=dropout, max_iters=16, lr_decay_iters=16, eval_interval=8)
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)

    split = tiny_cfg(out_dir=str(tmp_path / "split"), **{**kw, "max_iters": 8})
    train(split)
    train(dataclasses_replace(split, max_iters=16, init_from="resume"), explicit={"max_iters", "init_from"})

    a, b = final_params(straight.out_dir), final_params(split.out_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, _ = read_metrics(straight.out_dir)
    lb, _ = read_metrics(split.out_dir)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_takes_architecture_from_checkpoint(tiny_cfg):
    cfg = tiny_cfg(max_iters=4, eval_interval=4)
    train(cfg)
    # Defaults (12 layers, 768 wide) must not override the checkpoint's architecture...
    resumed = TrainConfig(
        **{**cfg.__dict__, "n_layer": 12, "n_embd": 768, "n_head": 12, "init_from": "resume", "max_iters": 6}
    )
    summary = train(resumed, explicit={"init_from", "max_iters"})
    assert summary["iter"] == 6
    # ...but an explicit override that conflicts with it is refused.
    with pytest.raises(UserError, match="n_layer"):
        train(dataclasses_replace(resumed, max_iters=8), explicit={"init_from", "n_layer"})


def test_eval_only_touches_no_checkpoint(tiny_cfg):
    cfg = tiny_cfg(max_iters=4, eval_interval=4)
    train(cfg)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    summary = train(dataclasses_replace(cfg, eval_only=True, init_from="resume"), explicit={"eval_only", "init_from"})
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before
    _, evals = read_metrics(cfg.out_dir)
    assert evals[-1]["val_loss"] == pytest.approx(summary["val_loss"])


def test_epoch_sampler_trains(tiny_cfg):
    summary = train(tiny_cfg(sampler="epoch", max_iters=10, eval_interval=10))
    assert summary["val_loss"] < 4.0


def test_sample_after_training(tiny_cfg, capsys):
    cfg = tiny_cfg(max_iters=10, eval_interval=10)
    train(cfg)
    texts = sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", num_samples=2, max_new_tokens=40, start="ROMEO:"))
    assert len(texts) == 2
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in texts)
    assert texts[0] != texts[1]
    assert "ROMEO:" in capsys.readouterr().out
    # The vocabulary travels in the checkpoint: no dataset folder needed to decode.
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", num_samples=1, max_new_tokens=5, start="ROMEO: é"))
    with pytest.raises(UserError, match="prompt file"):
        sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", start="FILE:/nonexistent/prompt.txt"))
    with pytest.raises(UserError, match="no checkpoint"):
        sample(SampleConfig(out_dir=cfg.out_dir + "-missing", device="cpu"))


def test_sampling_in_bfloat16_decodes_with_bfloat16_weights(tiny_cfg, monkeypatch):
    """dtype=bfloat16: the weights are cast once for decoding (not again by autocast at every token)."""
    from gptsmith.model import GPT

    cfg = tiny_cfg(max_iters=4, eval_interval=4)
    train(cfg)
    seen, real = [], GPT.generate
    monkeypatch.setattr(
        GPT, "generate", lambda self, *a, **k: seen.append(self.lm_head.weight.dtype) or real(self, *a, **k)
    )
    kw = dict(out_dir=cfg.out_dir, device="cpu", num_samples=1, max_new_tokens=20, start="ROMEO:")
    texts = sample(SampleConfig(dtype="bfloat16", **kw))
    assert seen == [torch.bfloat16] and len(texts[0]) == len("ROMEO:") + 20
    sample(SampleConfig(dtype="float32", **kw))
    assert seen[1] == torch.float32


def test_master_weights_train_through_bfloat16_copies_of_float32_weights(tiny_cfg, monkeypatch):
    """master_weights=True: forward and backward run through bfloat16 copies, the residual stream
    bfloat16 too; the optimizer and the checkpoint hold float32 weights, of which the copies are the
    rounding after every step; the losses follow autocast's closely (not bit for bit)."""
    made, residual = [], set()

    class Spy(optim.MasterWeights):
        def __init__(self, model) -> None:
            super().__init__(model)
            made.append(self)
            self.compute.transformer.h[0].register_forward_hook(lambda m, i, out: residual.add(out.dtype))

    monkeypatch.setattr(optim, "MasterWeights", Spy)
    kw = dict(dtype="bfloat16", max_iters=6, eval_interval=6, gradient_accumulation_steps=2)
    cfg = tiny_cfg(master_weights=True, **kw)
    train(cfg)
    (weights,) = made
    assert residual == {torch.bfloat16}
    assert weights.compute.lm_head.weight is weights.compute.transformer.wte.weight  # still tied
    assert {p.dtype for p in weights.copies} == {torch.bfloat16} and {p.dtype for p in weights.masters} == {
        torch.float32
    }
    saved = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["model"]
    for name, p in weights.compute.named_parameters():
        assert saved[name].dtype == torch.float32 and torch.equal(p, saved[name].to(torch.bfloat16)), name
    autocast = tiny_cfg(out_dir=cfg.out_dir + "-autocast", **kw)
    train(autocast)
    losses = [[r["loss"] for r in read_metrics(c.out_dir)[0]] for c in (cfg, autocast)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_master_weights_with_activation_checkpointing_recompute_the_bfloat16_blocks(tiny_cfg, tmp_path):
    """The bfloat16 copies are a deep copy of the model: their checkpointed blocks must recompute
    themselves (the same losses as without checkpointing), not the float32 blocks they came from."""
    kw = dict(dtype="bfloat16", master_weights=True, max_iters=4, eval_interval=4, dropout=0.1)
    runs = [tiny_cfg(out_dir=str(tmp_path / str(ac)), activation_checkpointing=ac, **kw) for ac in (False, True)]
    for cfg in runs:
        train(cfg)
    losses = [[r["loss"] for r in read_metrics(c.out_dir)[0]] for c in runs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_master_weights_add_micro_step_gradients_up_in_float32():
    """Each bfloat16 gradient goes into its float32 master as backward makes it: two micro-steps'
    sum is the float32 sum of the two bfloat16 gradients, not a bfloat16 one."""
    from gptsmith.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    weights = optim.MasterWeights(model)
    reference = copy.deepcopy(model)  # the same bfloat16 copies without the hooks: their gradients as made
    for p in reference.parameters():
        p.data = p.data.to(torch.bfloat16)
    batches = [torch.randint(0, 16, (4, 8)) for _ in range(4)]
    grads = []
    for x, y in (batches[:2], batches[2:]):
        weights.compute(x, y, return_logits=False)[1].backward()
        reference.zero_grad(set_to_none=True)
        reference(x, y, return_logits=False)[1].backward()
        grads.append([p.grad for p in reference.parameters()])
    assert all(p.grad is None for p in weights.copies)
    for master, g1, g2 in zip(weights.masters, *grads, strict=True):
        assert master.grad.dtype == torch.float32 and torch.equal(master.grad, g1.float() + g2.float())
    assert any(not torch.equal(m.grad, (g1 + g2).float()) for m, g1, g2 in zip(weights.masters, *grads))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"master_weights": True, "dtype": "float32"}, "needs dtype=bfloat16"),
        ({"master_weights": True, "dtype": "bfloat16", "parallel": "fsdp"}, "keeps bfloat16 copies itself"),
    ],
)
def test_master_weights_need_bfloat16_and_no_fsdp(tiny_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_cfg(**overrides)


def test_master_weights_refuse_a_float32_run_chosen_by_auto(tiny_cfg, monkeypatch):
    monkeypatch.setattr(train_module, "choose_training_dtype", lambda rt, *a: setattr(rt, "dtype", "float32"))
    with pytest.raises(UserError, match="computes in float32"):
        train(tiny_cfg(master_weights=True, dtype="auto"))


def test_batched_samples_match_one_at_a_time(tiny_cfg):
    """Greedy decoding: samples drawn side by side (5 in batches of 2, 2, 1) equal one drawn alone."""
    cfg = tiny_cfg(max_iters=10, eval_interval=10)
    train(cfg)
    kw = dict(out_dir=cfg.out_dir, device="cpu", max_new_tokens=70, start="ROMEO:", temperature=0.0)  # > block_size
    alone = sample(SampleConfig(num_samples=1, **kw))
    batched = sample(SampleConfig(num_samples=5, batch_size=2, **kw))
    assert batched == alone * 5
    drawn = sample(SampleConfig(num_samples=4, batch_size=4, **{**kw, "temperature": 1.0}))
    assert len(drawn) == 4 and len(set(drawn)) == 4  # sampled rows differ


@pytest.mark.slow
def test_compiled_model_saves_unwrapped_weights(tiny_cfg):
    cfg = tiny_cfg(compile=True, max_iters=2, eval_interval=2, n_layer=1)
    train(cfg)
    state = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert not any("_orig_mod" in k for k in state["model"])


# --- refused before any work starts ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be positive"),
        (dict(learning_rate=-1e-3), "learning_rate must be positive"),
        (dict(max_iters=-1), "max_iters must not be negative"),
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(min_lr=1.0), "min_lr"),
        (dict(dropout=1.5), "dropout"),
        (dict(init_from="gpt9"), "init_from"),
    ],
)
def test_nonsense_config_is_refused(tiny_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_cfg(**overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(device="tpu"), "device"),
        (dict(dtype="float8"), "dtype"),
        (dict(block_size=200_000), "block_size"),
        (dict(dataset="no_such_dataset"), "no_such_dataset"),
    ],
)
def test_bad_runtime_or_data_is_refused(tiny_cfg, overrides, message):
    cfg = tiny_cfg(**overrides)
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert not (Path(cfg.out_dir) / "ckpt.pt").exists()


def test_missing_dataset_names_prepare_command(tiny_cfg, tmp_path, monkeypatch):
    from gptsmith import data as dataset

    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "prepare.py").write_text("")
    monkeypatch.setattr(dataset, "DATA_ROOT", tmp_path / "data")  # a checkout where nothing is prepared yet
    with pytest.raises(UserError, match=r"run: python data/shakespeare_char/prepare.py"):
        train(tiny_cfg(dataset="shakespeare_char"))


def test_resume_without_checkpoint(tiny_cfg):
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_cfg(init_from="resume"))


def test_corrupt_checkpoint_is_refused_and_kept(tiny_cfg):
    cfg = tiny_cfg(max_iters=2, eval_interval=2)
    train(cfg)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="unreadable"):
        train(dataclasses_replace(cfg, init_from="resume", max_iters=4))
    assert ckpt.read_bytes() == blob[: len(blob) // 2]  # left as it was for the user to inspect


def test_token_ids_beyond_vocab_are_refused(tiny_cfg, tmp_path, char_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("meta.pkl", "val.bin"):
        (bad / name).write_bytes((char_data / name).read_bytes())
    tokens = np.fromfile(char_data / "train.bin", dtype=np.uint16)
    tokens[100] = 999
    tokens.tofile(bad / "train.bin")
    with pytest.raises(UserError, match="token id 999"):
        train(tiny_cfg(dataset=str(bad)))


def test_unwritable_out_dir(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        train(tiny_cfg(out_dir=str(blocker / "out")))
    assert blocker.read_text() == "not a folder"


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_cli_error_is_one_line(tiny_cfg):
    cfg = tiny_cfg()
    r = run_cli(["train.py", f"--dataset={cfg.dataset}x", "--device=cpu", f"--out_dir={cfg.out_dir}"])
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# --- distributed smoke run -------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_cfg, tmp_path):
    """2 gloo processes x 1 micro-step see exactly the data of 1 process x 2 micro-steps."""
    common = dict(max_iters=6, lr_decay_iters=6, eval_interval=6, gradient_accumulation_steps=2)
    single = tiny_cfg(out_dir=str(tmp_path / "one"), **common)
    train(single)
    args = [f"--{k}={v}" for k, v in single.__dict__.items() if k != "out_dir"] + [f"--out_dir={tmp_path / 'two'}"]
    r = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--backend=gloo", *args],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one, two = read_metrics(single.out_dir)[0], read_metrics(tmp_path / "two")[0]
    assert [r["iter"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    pa, pb = final_params(single.out_dir), final_params(tmp_path / "two")
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6)


GLOO_THREADS = """
import os, sys
from gptsmith import trainer

def gloo_threads():
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return [n for n in names if "gloo" in n]

real, during = trainer.teardown, []
def spy(rt):
    during.extend(gloo_threads())
    real(rt)
trainer.teardown = spy
trainer.main(sys.argv[1:])
print("during:", len(during), "after:", len(gloo_threads()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_torchrun_leaves_no_process_group_threads_running(tiny_cfg, tmp_path):
    """After training, teardown must really end the process group: DDP's imports once kept it
    alive, and its gloo threads ran on into interpreter shutdown (the likely cause of a rank that
    aborted in CI)."""
    cfg = tiny_cfg(max_iters=2, lr_decay_iters=2, eval_interval=2)
    script = tmp_path / "probe.py"
    script.write_text(GLOO_THREADS)
    args = [f"--{k}={v}" for k, v in cfg.__dict__.items()]
    r = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script), "--backend=gloo", *args],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    counts = r.stdout.strip().splitlines()[-1].split()
    assert int(counts[1]) > 0, r.stdout  # the group ran on gloo threads (or this check sees nothing)
    assert int(counts[3]) == 0, r.stdout


# --- trust: resume under the defaults, honest log lines, the run's settings win ------------------


def test_resume_is_exact_when_the_peak_is_measured_at_each_start(tiny_cfg, tmp_path, monkeypatch):
    """peak_flops=0 (the default) measures the matmul peak at startup when none is remembered:
    that must not move the dropout random streams that a resume has just restored."""
    kw = dict(dropout=0.1, max_iters=16, lr_decay_iters=16, eval_interval=8)
    runs = iter(range(10))
    real = runtime.peak_cache_path
    monkeypatch.setattr(
        runtime, "peak_cache_path", lambda: tmp_path / f"cache{next(runs)}" / real().name
    )  # nothing remembered
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)
    split = tiny_cfg(out_dir=str(tmp_path / "split"), **{**kw, "max_iters": 8})
    train(split)
    train(dataclasses_replace(split, max_iters=16, init_from="resume"), explicit={"max_iters", "init_from"})
    assert next(runs) == 3  # every start measured
    a, b = final_params(straight.out_dir), final_params(split.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_only_watches_training_does_not_change_it(tiny_cfg, tmp_path, monkeypatch, wandb_dir):
    """Measuring the peak, eval samples, loss.png and wandb leave every random stream alone."""
    kw = dict(dropout=0.1, max_iters=12, lr_decay_iters=12, eval_interval=4)
    plain = tiny_cfg(out_dir=str(tmp_path / "plain"), peak_flops=1e11, **kw)
    train(plain)
    monkeypatch.setenv("GPTSMITH_CACHE_DIR", str(tmp_path / "empty-cache"))
    watched = tiny_cfg(
        out_dir=str(tmp_path / "watched"),
        eval_sample_tokens=16,
        plot=True,
        wandb_log=True,
        wandb_run_name="watched",
        **kw,
    )
    train(watched)
    a, b = final_params(plain.out_dir), final_params(watched.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


class StepClock:
    """A fake time.perf_counter for train.py: one second per training micro-step, nothing else."""

    def __init__(self, monkeypatch) -> None:
        self.now = 0.0
        real_get_batch = train_module.ds.get_batch

        def get_batch(data, offsets, block_size, device):
            if torch.is_grad_enabled():  # training, not evaluation
                self.now += 1.0
            return real_get_batch(data, offsets, block_size, device)

        fake_time = types.SimpleNamespace(perf_counter=lambda: self.now, time=time.time)
        monkeypatch.setattr(train_module, "time", fake_time)
        monkeypatch.setattr(metrics, "time", fake_time)
        monkeypatch.setattr(train_module.ds, "get_batch", get_batch)


def test_log_lines_count_the_steps_since_the_last_line_or_eval(tiny_cfg, monkeypatch):
    """eval_interval 6, log_interval 8: a log line after an eval covers fewer than 8 steps, and a resume
    at step 6 logs first at step 8; each step takes one (fake) second, so every line must say so."""
    StepClock(monkeypatch)
    cfg = tiny_cfg(max_iters=24, lr_decay_iters=24, eval_interval=6, log_interval=8, peak_flops=1e11)
    train(dataclasses_replace(cfg, max_iters=6))
    train(dataclasses_replace(cfg, init_from="resume"), explicit={"init_from"})
    logs, _ = read_metrics(cfg.out_dir)
    tokens_per_step = cfg.batch_size * cfg.block_size
    assert [r["iter"] for r in logs] == [8, 16, 24]
    assert [r["tokens_per_sec"] for r in logs] == [tokens_per_step] * 3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_applies_the_runs_optimizer_settings(tiny_cfg, tmp_path, optimizer):
    """The checkpoint gives the moments, this run's config the hyper-parameters."""
    first = dict(weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.02, muon_momentum=0.95, muon_ns_steps=5)
    changed = dict(weight_decay=0.05, beta1=0.8, beta2=0.9, muon_lr=0.01, muon_momentum=0.9, muon_ns_steps=3)
    runs = {}
    for name, settings in (("same", first), ("changed", changed)):
        cfg = tiny_cfg(out_dir=str(tmp_path / name), optimizer=optimizer, max_iters=6, lr_decay_iters=12, **first)
        train(cfg)
        train(dataclasses_replace(cfg, max_iters=12, init_from="resume", **settings), {"init_from", *settings})
        runs[name] = ckpt_io.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    states = runs["changed"]["optimizer"].get("optimizers", [runs["changed"]["optimizer"]])
    groups = [g for state in states for g in state["param_groups"]]
    adamw = [g for g in groups if "betas" in g]
    assert {g["betas"] for g in adamw} == {(0.8, 0.9)} and max(g["weight_decay"] for g in adamw) == 0.05
    if optimizer == "muon":
        (muon,) = [g for g in groups if "ns_steps" in g]
        assert (muon["momentum"], muon["ns_steps"], muon["weight_decay"]) == (0.9, 3, 0.05)
        assert muon["lr_scale"] * cfg.learning_rate == pytest.approx(0.01)
    a, b = runs["same"]["model"], runs["changed"]["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the new settings took effect


def test_init_from_auto_starts_then_resumes(tiny_cfg, tmp_path, capsys):
    kw = dict(dropout=0.1, lr_decay_iters=16, eval_interval=8)
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), max_iters=16, **kw)
    train(straight)
    auto = tiny_cfg(out_dir=str(tmp_path / "auto"), init_from="auto", max_iters=8, **kw)
    assert train(auto)["iter"] == 8
    assert "no checkpoint at" in capsys.readouterr().out
    assert train(dataclasses_replace(auto, max_iters=16), {"init_from", "max_iters"})["iter"] == 16
    assert "init_from=auto: resuming from" in capsys.readouterr().out
    a, b = final_params(straight.out_dir), final_params(auto.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
