"""Several processes: FSDP2 and DDP against one process, sharded checkpoints (exact resume,
resharding, crash safety, consolidation), total_batch_size and activation checkpointing.

The 2-process runs share one torchrun launch of this file (see the bottom), which trains
each configuration in turn in one gloo process group: starting Python and torch is most of
the time a launch takes on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import init_from, parallel, runtime, trainer
from gptsmith.checkpoint import consolidate, consolidate_main
from gptsmith.config import ConsolidateConfig, SampleConfig, TrainConfig
from gptsmith.configurator import UserError
from gptsmith.model import GPT, GPTConfig
from gptsmith.runtime import setup_runtime, teardown
from gptsmith.sampler import sample
from gptsmith.trainer import main as train_main
from gptsmith.trainer import train
from helpers import ROOT, TINY, nan_after, read_metrics

# A tiny model, 4 micro-steps per optimizer step (2 per process on 2), 3 eval batches (uneven over 2).
SMALL = {**TINY, "lr_decay_iters": 10, "max_iters": 8, "eval_interval": 4, "eval_iters": 3,
         "gradient_accumulation_steps": 4}  # fmt: skip


def small_cfg(char_data: Path, out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(dataset=str(char_data), out_dir=str(out_dir), **{**SMALL, **overrides})


def step_losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir)[0]]


def val_losses(out_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(out_dir)[1]]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(path)["model"]


def consolidated(out_dir: Path, dest: Path, **kw) -> dict:
    """The single-file checkpoint of out_dir/ckpt.dcp, written to dest."""
    consolidate(ConsolidateConfig(out_dir=str(out_dir), output=str(dest), **kw))
    return ckpt_io.load_checkpoint(dest)


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# --- two processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch of 2 processes training each run below, and the one-process
    baseline trained here meanwhile; returns the folder holding every run's out_dir."""
    root = tmp_path_factory.mktemp("dist")
    (root / "ddp").mkdir()
    dist_runs = [
        (small_cfg(char_data, root / "fsdp", parallel="fsdp", activation_checkpointing=True, eval_sample_tokens=8), []),
        (small_cfg(char_data, root / "ddp", parallel="ddp", activation_checkpointing=True), []),
        # from the ddp run's weights (its out_dir, made now: the config checks that init_from exists)
        (small_cfg(char_data, root / "from_ddp", parallel="fsdp", init_from=str(root / "ddp")), ["init_from"]),
        (small_cfg(char_data, root / "straight", parallel="fsdp", dropout=0.1), []),
        (small_cfg(char_data, root / "split", parallel="fsdp", dropout=0.1, max_iters=4), []),
        (small_cfg(char_data, root / "split", parallel="fsdp", dropout=0.1, init_from="resume"), ["init_from"]),
    ]
    spec = root / "runs.json"
    spec.write_text(json.dumps([[dataclasses.asdict(cfg), explicit] for cfg, explicit in dist_runs]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(spec)]
    with open(root / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            train(small_cfg(char_data, root / "one", eval_sample_tokens=8))  # while the processes start up
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, (root / "torchrun.log").read_text()[-4000:]
    return root


@pytest.mark.slow
def test_fsdp_and_ddp_match_one_process(runs):
    """Same global batch, 2 micro-steps per process: the same losses and weights as 1 process x 4."""
    one = weights(runs / "one" / "ckpt.pt")
    for name in ("fsdp", "ddp"):
        assert step_losses(runs / name) == pytest.approx(step_losses(runs / "one"), rel=1e-5), name
        assert val_losses(runs / name) == pytest.approx(val_losses(runs / "one"), rel=1e-5), name  # 3 batches on 2
    assert_close_weights(weights(runs / "ddp" / "ckpt.pt"), one)
    assert_close_weights(consolidated(runs / "fsdp", runs / "fsdp.pt")["model"], one)
    # eval samples ran on both processes under FSDP (collective forward passes) and printed once.
    assert (runs / "torchrun.log").read_text().count("sample at step") == 3  # the fsdp run's 3 evals


@pytest.mark.slow
def test_fsdp_from_pretrained_weights_matches_one_process(runs, char_data):
    """Two processes under FSDP from another run's weights, which rank 0 alone reads (rank 1 builds the
    shapes and receives its shards): the losses of one process starting from the same weights."""
    one = small_cfg(char_data, runs / "from_ddp_one", init_from=str(runs / "ddp" / "ckpt.pt"))
    train(one, {"init_from"})
    assert step_losses(runs / "from_ddp") == pytest.approx(step_losses(runs / "from_ddp_one"), rel=1e-5)
    assert val_losses(runs / "from_ddp") == pytest.approx(val_losses(runs / "from_ddp_one"), rel=1e-5)


@pytest.mark.slow
def test_fsdp_resume_is_exact(runs):
    """8 steps straight == 4 steps, resume, 4 steps, with dropout: per-rank RNG, sharded optimizer."""
    assert step_losses(runs / "split") == step_losses(runs / "straight")
    a = consolidated(runs / "straight", runs / "straight.pt")
    b = consolidated(runs / "split", runs / "split.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    folder = runs / "split" / "ckpt.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    assert not list((runs / "split").glob(".*"))  # no temporary or old folders left behind
    state = ckpt_io.load_train_state(folder)
    assert state["iter_num"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_consolidated_checkpoint_is_ordinary_and_samples(runs, capsys):
    consolidate_main([f"--out_dir={runs / 'fsdp'}", "--ckpt=best.dcp", "--optimizer=False"])
    assert "wrote" in capsys.readouterr().out
    state = ckpt_io.load_checkpoint(runs / "fsdp" / "best.pt")
    single = ckpt_io.load_checkpoint(runs / "one" / "ckpt.pt")
    assert set(state) == set(single) - {"optimizer"}
    assert state["model"].keys() == single["model"].keys()  # no _orig_mod. or FSDP prefixes
    assert state["iter_num"] == 8 and state["meta"]["vocab_size"] == 65
    texts = sample(
        SampleConfig(
            out_dir=str(runs / "fsdp"), ckpt="best.pt", device="cpu", num_samples=2, max_new_tokens=20, start="ROMEO:"
        )
    )
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == 26 for t in texts)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(runs, char_data):
    """DCP reshards: the 2-process checkpoint goes on in 1 process (FSDP), and so does its
    consolidated file without FSDP; both match the 1-process run going on."""
    for name in ("one", "fsdp"):
        shutil.copytree(runs / name, runs / f"{name}-10")
    plain = runs / "plain-10"
    plain.mkdir()
    consolidated(runs / "fsdp", plain / "ckpt.pt")  # the step-8 checkpoint, with optimizer state
    resume = dict(max_iters=10, init_from="resume")
    train(small_cfg(char_data, runs / "one-10", **resume), {"init_from"})
    train(small_cfg(char_data, runs / "fsdp-10", parallel="fsdp", **resume), {"init_from"})
    train(small_cfg(char_data, plain, **resume), {"init_from"})

    reference = weights(runs / "one-10" / "ckpt.pt")
    assert step_losses(runs / "fsdp-10")[-2:] == pytest.approx(step_losses(runs / "one-10")[-2:], rel=1e-5)
    assert_close_weights(consolidated(runs / "fsdp-10", runs / "fsdp-10.pt")["model"], reference)
    assert step_losses(plain) == pytest.approx(step_losses(runs / "one-10")[-2:], rel=1e-5)
    assert_close_weights(weights(plain / "ckpt.pt"), reference)


# --- sharded checkpoints in one process --------------------------------------------------------


@pytest.fixture
def sharded_model():
    """A tiny FSDP-sharded model and its optimizer in a process group of one."""
    rt = setup_runtime("cpu", "float32", group=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    parallel.shard(model, rt)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    yield model, optimizer
    teardown(rt)


def train_state(iter_num: int) -> dict:
    return {"iter_num": iter_num, "model_args": {}, "config": {}}


def test_sharded_save_killed_midway_keeps_a_complete_checkpoint(sharded_model, tmp_path, monkeypatch):
    model, optimizer = sharded_model
    path = tmp_path / "ckpt.dcp"
    ckpt_io.save_sharded(path, model, optimizer, train_state(1), master=True)
    tmp, old = tmp_path / ".ckpt.dcp.tmp", tmp_path / ".ckpt.dcp.old"

    # Killed while writing: the shards are there, train_state.pt is not; the old folder is untouched.
    with monkeypatch.context() as m:
        m.setattr(ckpt_io, "save_checkpoint", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            ckpt_io.save_sharded(path, model, optimizer, train_state(2), master=True)
    assert tmp.is_dir() and not ckpt_io.is_sharded(tmp)
    assert ckpt_io.load_train_state(ckpt_io.readable_sharded(path))["iter_num"] == 1
    ckpt_io.recover_sharded(path)
    assert not tmp.exists() and ckpt_io.load_train_state(path)["iter_num"] == 1

    # Killed between the two renames: no ckpt.dcp at all, but the new folder is complete.
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(src)
        if len(calls) == 3:  # 1: train_state.pt into place, 2: ckpt.dcp aside, 3: the new folder in
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_then_die)
        with pytest.raises(KeyboardInterrupt):
            ckpt_io.save_sharded(path, model, optimizer, train_state(3), master=True)
    assert not path.exists() and old.is_dir() and ckpt_io.is_sharded(tmp)
    assert ckpt_io.load_train_state(ckpt_io.readable_sharded(path))["iter_num"] == 3  # read-only, for consolidate.py
    ckpt_io.recover_sharded(path)
    assert ckpt_io.load_train_state(path)["iter_num"] == 3 and not tmp.exists() and not old.exists()
    ckpt_io.load_sharded(path, model, optimizer)


def test_sharded_checkpoint_of_another_model_is_refused(sharded_model, tmp_path):
    model, optimizer = sharded_model
    ckpt_io.save_sharded(tmp_path / "ckpt.dcp", model, optimizer, train_state(1), master=True)
    wider = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="cannot be loaded into this model"):
        ckpt_io.load_sharded(tmp_path / "ckpt.dcp", wider, None)


def test_nonfinite_steps_under_fsdp(tiny_cfg, tmp_path, monkeypatch, capsys):
    """FSDP in one process: a NaN stops training before the step, the sharded checkpoint stays
    good; with skip_nonfinite the bad steps change nothing."""
    cfg = tiny_cfg(parallel="fsdp", max_iters=10, eval_interval=5, lr_decay_iters=10)
    nan_after(monkeypatch, 7)  # one forward with grad per step
    with pytest.raises(UserError, match="non-finite loss or gradient at step 7"):
        train(cfg)
    good = consolidated(Path(cfg.out_dir), tmp_path / "step5.pt")
    assert good["iter_num"] == 5
    train(dataclasses.replace(cfg, init_from="resume", skip_nonfinite=True), {"init_from"})  # every step NaN now
    assert "step 9: skipped" in capsys.readouterr().out
    after = consolidated(Path(cfg.out_dir), tmp_path / "step10.pt")
    assert after["iter_num"] == 10
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


MODEL_OPTIONS = [
    {},
    {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "swiglu", "tie_weights": False},
    {"n_kv_head": 1, "activation": "relu2", "bias": False},
]


@pytest.mark.parametrize("options", MODEL_OPTIONS)
def test_a_model_built_on_the_meta_device_gets_the_weights_of_one_built_whole(options):
    """parallel.materialize draws each shard's values as GPT(config) draws the whole model: the same
    random stream, module by module; norms, biases and the rotary tables too."""
    rt = setup_runtime("cpu", "float32", group=True)
    try:
        config = GPTConfig(block_size=16, vocab_size=33, n_layer=2, n_head=2, n_embd=16, **options)
        torch.manual_seed(5)
        whole = GPT(config)
        with torch.device("meta"):
            model = GPT(config)
        parallel.shard(model, rt)
        parallel.materialize(model, rt, seed=5)
        got = {k: v.full_tensor() for k, v in model.state_dict().items()}
        assert got.keys() == whole.state_dict().keys()
        for k, v in whole.state_dict().items():
            assert torch.equal(got[k], v), k
        for k, v in whole.named_buffers():
            assert torch.equal(dict(model.named_buffers())[k], v), k
    finally:
        teardown(rt)


@pytest.mark.parametrize("fault", ["sets nothing", "sets part"])
def test_materialize_refuses_an_initialiser_that_leaves_a_shard_unset(fault):
    """A reset_parameters that sets none or only part of a parameter would leave to_empty's garbage
    in the shards (nothing is gathered to start from): materialize names the module instead."""
    rt = setup_runtime("cpu", "float32", group=True)
    try:
        config = GPTConfig(block_size=16, vocab_size=33, n_layer=1, n_head=2, n_embd=16)
        with torch.device("meta"):
            model = GPT(config)
        parallel.shard(model, rt)
        ln = model.transformer.ln_f
        ln.reset_parameters = (lambda: None) if fault == "sets nothing" else (lambda: ln.weight[:3].fill_(1.0))
        with pytest.raises(RuntimeError, match="set (nothing|part) of its parameter 'weight'"):
            parallel.materialize(model, rt, seed=5)
    finally:
        teardown(rt)


def test_fsdp_builds_a_new_model_on_the_meta_device_and_trains_as_one_process(tiny_cfg, tmp_path, monkeypatch):
    """No process holds the whole model under FSDP: it is built on the meta device (its weights
    drawn shard by shard), and trains with the losses of a plain one-process run."""
    built = []

    class Spy(GPT):
        def __init__(self, config: GPTConfig) -> None:
            super().__init__(config)
            built.append(self.lm_head.weight.device.type)

    monkeypatch.setattr(trainer, "GPT", Spy)
    sharded = tiny_cfg(parallel="fsdp", max_iters=3, eval_interval=3, out_dir=str(tmp_path / "fsdp"))
    train(sharded)
    assert built == ["meta"]
    plain = tiny_cfg(max_iters=3, eval_interval=3)
    train(plain)
    assert built == ["meta", "cpu"]
    losses = [step_losses(Path(c.out_dir)) for c in (sharded, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 3


def test_fsdp_starts_from_pretrained_weights_the_first_process_sends(tiny_cfg, tmp_path, monkeypatch):
    """init_from another run's checkpoint under FSDP: the model is sharded as shapes and given the
    weights rank 0 read (parallel.load_from_first); it trains with the losses of a plain run from them."""
    source = tiny_cfg(max_iters=2, eval_interval=2, out_dir=str(tmp_path / "source"))
    train(source)
    ckpt = str(Path(source.out_dir) / "ckpt.pt")
    sent = []
    real = parallel.load_from_first
    monkeypatch.setattr(parallel, "load_from_first", lambda m, w, rt: sent.append(sorted(w)) or real(m, w, rt))
    runs = [
        tiny_cfg(init_from=ckpt, max_iters=3, eval_interval=3, out_dir=str(tmp_path / name), parallel=mode)
        for name, mode in (("fsdp", "fsdp"), ("plain", "ddp"))
    ]
    for cfg in runs:
        train(cfg, {"init_from"})
    assert len(sent) == 1 and "lm_head.weight" in sent[0]  # the FSDP run's, with rank 0's full weights
    losses = [step_losses(Path(c.out_dir)) for c in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 3


def test_other_processes_take_a_pretrained_model_as_shapes_without_reading_its_weights(tiny_cfg, tmp_path, monkeypatch):
    source = tiny_cfg(max_iters=1, eval_interval=1, out_dir=str(tmp_path / "source"))
    train(source)
    cfg = tiny_cfg(init_from=str(Path(source.out_dir) / "ckpt.pt"), parallel="fsdp", out_dir=str(tmp_path / "new"))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(ckpt_io, "model_from_checkpoint", no_weights)
    start = init_from.resolve(cfg, {"init_from"}, Path(cfg.out_dir), master=False)
    assert start.pretrained.lm_head.weight.is_meta and start.pretrained.config.n_embd == TINY["n_embd"]
    with pytest.raises(AssertionError, match="the weights were loaded"):
        init_from.resolve(cfg, {"init_from"}, Path(cfg.out_dir), master=True)


def fake_sharded(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    (folder / "train_state.pt").write_bytes(b"")


def test_checkpoint_format_mismatch_names_the_fix(tiny_cfg):
    cfg = tiny_cfg(init_from="resume")
    fake_sharded(Path(cfg.out_dir) / "ckpt.dcp")
    with pytest.raises(UserError, match=r"--parallel=fsdp, or make a single file of it first \(python consolidate.py"):
        train(cfg)
    with pytest.raises(UserError, match="python consolidate.py"):
        sample(SampleConfig(out_dir=cfg.out_dir, device="cpu"))
    shutil.rmtree(Path(cfg.out_dir) / "ckpt.dcp")
    (Path(cfg.out_dir) / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint at .*ckpt.dcp.*--parallel=ddp"):
        train(dataclasses.replace(cfg, parallel="fsdp"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(parallel="zero"), "parallel must be 'ddp' or 'fsdp'"),
        (dict(parallel="fsdp", dtype="float16"), "does not support dtype=float16"),
        (dict(total_batch_size=-1), "total_batch_size must not be negative"),
        (dict(total_batch_size=1000), r"multiple of batch_size \* block_size \(8 \* 32 = 256.*total_batch_size=1024"),
    ],
)
def test_bad_parallel_or_batch_settings_are_refused(tiny_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_cfg(**overrides)


# --- total_batch_size --------------------------------------------------------------------------


def test_total_batch_size_sets_accumulation_steps(tiny_cfg):
    cfg = tiny_cfg(total_batch_size=1024)  # 4 micro-steps of 8 x 32 tokens
    assert cfg.accumulation_steps(1) == 4
    assert cfg.accumulation_steps(4) == 4
    # total_batch_size wins over gradient_accumulation_steps, e.g. config/train_gpt2.py's 40
    assert (dataclasses.replace(cfg, gradient_accumulation_steps=40)).accumulation_steps(2) == 4
    assert (tiny_cfg(gradient_accumulation_steps=6)).accumulation_steps(3) == 6  # unused: as before
    with pytest.raises(UserError, match=r"4 micro-steps .* 3 processes cannot share .*--total_batch_size=768"):
        cfg.accumulation_steps(3)
    with pytest.raises(UserError, match="divisible by the world size"):
        (tiny_cfg(gradient_accumulation_steps=3)).accumulation_steps(2)


def test_total_batch_size_in_training(tiny_cfg, capsys):
    summary = train(tiny_cfg(total_batch_size=512, max_iters=2, eval_interval=2, eval_iters=1))
    assert "tokens per step: 512 (2 micro-steps per rank)" in capsys.readouterr().out
    assert summary["tokens_seen"] == 1024


def test_total_batch_size_error_on_the_command_line(tiny_cfg, capsys):
    cfg = tiny_cfg()
    with pytest.raises(SystemExit) as exit_info:
        train_main(
            [
                f"--dataset={cfg.dataset}",
                "--batch_size=8",
                "--block_size=32",
                "--total_batch_size=1000",
                "--device=cpu",
                f"--out_dir={cfg.out_dir}",
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: total_batch_size (1000) must be a multiple of batch_size")


# --- activation checkpointing ------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.1))
    recomputed = copy.deepcopy(plain)
    parallel.checkpoint_activations(recomputed)
    x, y = torch.randint(0, 32, (4, 16)), torch.randint(0, 32, (4, 16))
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same dropout masks, also when the blocks are recomputed
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()  # checkpoints are unchanged
    prompt = x[:1, :4]  # generation (no grad) runs the blocks directly
    assert torch.equal(
        plain.eval().generate(prompt, 4, temperature=0), recomputed.eval().generate(prompt, 4, temperature=0)
    )


# --- elastic restarts: torchrun --max-restarts with init_from=auto -------------------------------


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun's workers and then torchrun itself (whichever are still there)."""
    try:
        pids = [*_children(pid), pid]
    except FileNotFoundError:  # already gone
        return
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_killed(char_data, tmp_path, mode):
    """torchrun restarts every worker with the same arguments; init_from=auto resumes them from the
    last checkpoint, and the restarted round must rendezvous cleanly (see runtime._restart_safe_rendezvous)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the workers")
    cfg = small_cfg(
        char_data,
        tmp_path / "x",
        parallel=mode,
        dropout=0.1,
        max_iters=40,
        lr_decay_iters=40,
        eval_interval=10,
        gradient_accumulation_steps=2,
        init_from="auto",
    )
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    finals = {}
    for name, kill in (("straight", False), ("killed", True)):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=2",
            "--monitor-interval=0.5",
            "train.py",
            *args,
            f"--out_dir={out}",
            "--backend=gloo",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(300, _kill_tree, [proc.pid])  # a hung worker fails the test, not the suite
        watchdog.start()
        lines, kills = [], ["iter 25:", "iter 35:"] if kill else []  # past the checkpoints at steps 20 and 30
        try:
            for line in proc.stdout:
                lines.append(line)
                if kills and line.startswith(kills[0]):
                    os.kill(_children(proc.pid)[len(kills) % 2], signal.SIGKILL)  # rank 0's process, then rank 1's
                    kills.pop(0)
        finally:  # never left armed: it would keep pytest waiting and then signal whatever has that pid
            watchdog.cancel()
        assert proc.wait(timeout=60) == 0, "".join(lines)[-4000:]
        log = "".join(lines)
        assert log.count("init_from=auto: resuming from") == (2 if name == "killed" else 0), log[-3000:]
        finals[name] = (
            consolidated(out, tmp_path / f"{name}.pt")["model"] if mode == "fsdp" else weights(out / "ckpt.pt")
        )
    a, b = finals["straight"], finals["killed"]
    assert all(torch.equal(a[k], b[k]) for k in a)


TEARDOWN_WITH_WORK_IN_FLIGHT = """
import time, torch
from gptsmith import parallel
from gptsmith.runtime import setup_runtime, teardown

rt = setup_runtime("cpu", "float32", "gloo")
model = parallel.wrap_ddp(torch.nn.Linear(4, 4), rt)
if rt.rank == 1:
    time.sleep(2)  # rank 0 tears down while its all_gather still waits for this one
outs = [torch.zeros(3) for _ in range(2)]
work = torch.distributed.all_gather(outs, torch.ones(3), async_op=True)
del work, outs  # from here only a gloo thread holds the tensors, and must take the GIL to drop them
teardown(rt)
del model
print(f"rank {rt.rank} done")  # one write: the two ranks share torchrun's stdout
"""


def test_teardown_ends_the_group_while_a_gloo_thread_still_holds_tensors(tmp_path):
    """A finished collective's Python tensors are dropped by gloo's thread, which needs the GIL.
    If DDP's reducer were the group's last holder, the group's destructor would wait for that
    thread with the GIL held: the hang seen at the end of a 2-process run. teardown frees the
    reducer first (parallel.release_reducer), so the group ends with the GIL released."""
    script = tmp_path / "probe.py"
    script.write_text(TEARDOWN_WITH_WORK_IN_FLIGHT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail("teardown hung:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0 done" in out and "rank 1 done" in out, out[-3000:]


# --- torchrun entry point: the `runs` fixture launches this file ---------------------------------


def _train_each(spec: str) -> None:
    """Train each [config, explicit keys] of the JSON file spec in turn, in one process group
    (made by runtime.init_group, so that destroying it really ends it: see there)."""
    runtime.init_group("gloo", "cpu")
    try:
        for config, explicit in json.loads(Path(spec).read_text()):
            train(TrainConfig(**config), set(explicit))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("device,expected", [("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("cpu", None)])
def test_the_process_group_gets_an_indexed_device(monkeypatch, device, expected):
    """init_process_group refuses device_id=cuda without an index (FSDP in one process, no torchrun)."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    runtime.init_group("nccl", device)
    assert seen["device_id"] == (torch.device(expected) if expected else None)


if __name__ == "__main__":
    _train_each(sys.argv[1])
