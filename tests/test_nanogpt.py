"""A nanoGPT user's things keep working: its config files mean what they meant, its checkpoints
sample and resume, its meta.pkl loads, and its sliding-window sampling is one option away."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith.config import SampleConfig, TrainConfig
from gptsmith.configurator import UserError, read_overrides
from gptsmith.model import GPT, GPTConfig
from gptsmith.sampler import sample
from gptsmith.trainer import main as train_main
from gptsmith.trainer import train
from helpers import ROOT

# nanoGPT's own config files, as its users have them (plain assignments; the values are nanoGPT's).
NANOGPT_TRAIN_GPT2 = """\
wandb_log = True
wandb_project = 'owt'
wandb_run_name='gpt2-124M'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
"""
NANOGPT_EVAL_GPT2 = """\
batch_size = 8
eval_iters = 500 # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
"""
NANOGPT_SHAKESPEARE_CHAR = """\
out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
"""
# nanoGPT's train.py defaults, which its config files rely on.
NANOGPT_DEFAULTS = dict(
    out_dir="out",
    eval_interval=2000,
    log_interval=1,
    eval_iters=200,
    eval_only=False,
    always_save_checkpoint=True,
    init_from="scratch",
    wandb_log=False,
    wandb_project="owt",
    wandb_run_name="gpt2",
    dataset="openwebtext",
    gradient_accumulation_steps=40,
    batch_size=12,
    block_size=1024,
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=False,
    learning_rate=6e-4,
    max_iters=600000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    decay_lr=True,
    warmup_iters=2000,
    lr_decay_iters=600000,
    min_lr=6e-5,
    compile=True,
)


def config_from(tmp_path: Path, text: str, *overrides: str) -> TrainConfig:
    path = tmp_path / "nanogpt_config.py"
    path.write_text(text)
    return TrainConfig(**read_overrides(TrainConfig, [str(path), *overrides]))


def test_defaults_are_nanogpts():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in NANOGPT_DEFAULTS} == NANOGPT_DEFAULTS


def test_nanogpt_config_files_mean_what_they_mean_in_nanogpt(tmp_path):
    gpt2 = config_from(tmp_path, NANOGPT_TRAIN_GPT2)
    assert (gpt2.dataset, gpt2.gradient_accumulation_steps, gpt2.n_layer, gpt2.bias) == ("openwebtext", 40, 12, False)
    evaluate = config_from(tmp_path, NANOGPT_EVAL_GPT2)
    assert (evaluate.dataset, evaluate.init_from, evaluate.eval_only) == ("openwebtext", "gpt2", True)
    char = config_from(tmp_path, NANOGPT_SHAKESPEARE_CHAR)
    assert (char.dataset, char.gradient_accumulation_steps, char.dropout) == ("shakespeare_char", 1, 0.2)


def test_nanogpt_train_gpt2_config_trains_on_openwebtext_from_the_current_folder(tmp_path, monkeypatch, capsys):
    """Run from a folder holding data/openwebtext (GPT-2 tokens, no meta.pkl), as nanoGPT is run from its clone."""
    data = tmp_path / "data" / "openwebtext"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 4_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train_gpt2.py").write_text(NANOGPT_TRAIN_GPT2)
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=16",
        "--batch_size=2",
        "--max_iters=1",
        "--eval_iters=1",
        "--wandb_log=False",
        "--device=cpu",
        "--compile=False",
    ]
    train_main(["config/train_gpt2.py", *tiny])
    out = capsys.readouterr().out
    assert "tokens per step: 1,280 (40 micro-steps per rank)" in out  # 40 x 2 x 16: nanoGPT's accumulation
    assert "data: train 20,000 tokens, val 4,000 tokens" in out  # ./data/openwebtext, not shakespeare
    state = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert state["model_args"]["vocab_size"] == 50304 and state["tokenizer"] == "gpt2"


# --- nanoGPT's checkpoints ---------------------------------------------------------------------


@pytest.fixture
def nanogpt_run(tiny_cfg, tmp_path) -> Path:
    """An out_dir holding a checkpoint as nanoGPT's train.py writes it: compiled-model weight names,
    seven model_args, a tensor best_val_loss, nanoGPT's config keys; no vocabulary, no RNG states."""
    ours = tiny_cfg(out_dir=str(tmp_path / "ours"), max_iters=10, lr_decay_iters=10, eval_interval=10)
    train(ours)
    state = ckpt_io.load_checkpoint(Path(ours.out_dir) / "ckpt.pt")
    args = state["model_args"]
    out = tmp_path / "out-shakespeare-char"
    out.mkdir()
    nano = {
        "model": {f"_orig_mod.{k}": v for k, v in state["model"].items()},
        "optimizer": state["optimizer"],
        "model_args": {
            k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
        },
        "iter_num": state["iter_num"],
        "best_val_loss": torch.tensor(state["best_val_loss"]),
        "config": {**{k: v for k, v in NANOGPT_DEFAULTS.items()}, "dataset": "shakespeare_char", "device": "cpu"},
    }
    torch.save(nano, out / "ckpt.pt")
    return out


def test_nanogpt_checkpoint_without_its_meta_pkl_is_one_clear_error(nanogpt_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/shakespeare_char here
    with pytest.raises(UserError, match=r"records no vocabulary.*65 tokens.*--dataset="):
        sample(SampleConfig(out_dir=str(nanogpt_run), device="cpu", num_samples=1, max_new_tokens=5))
    r = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--out_dir={nanogpt_run}", "--device=cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_nanogpt_checkpoint_samples_with_the_dataset_named_or_found(nanogpt_run, char_data, tmp_path, monkeypatch):
    kw = dict(out_dir=str(nanogpt_run), device="cpu", num_samples=1, max_new_tokens=20, start="A", seed=3)
    named = sample(SampleConfig(dataset=str(char_data), **kw))
    (tmp_path / "data").mkdir()
    shutil.copytree(char_data, tmp_path / "data" / "shakespeare_char")  # where nanoGPT keeps it
    monkeypatch.chdir(tmp_path)
    found = sample(SampleConfig(**kw))
    assert named == found and len(found[0]) == 21


def test_init_from_a_nanogpt_checkpoint(nanogpt_run, tiny_cfg, char_data, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copytree(char_data, tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(init_from=str(nanogpt_run / "ckpt.pt"), out_dir=str(tmp_path / "ft"), max_iters=4, lr_decay_iters=4)
    summary = train(cfg, {"init_from"})
    assert summary["iter"] == 4


def test_resume_a_nanogpt_run(nanogpt_run, tiny_cfg, char_data, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copytree(char_data, tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(
        init_from="resume", out_dir=str(nanogpt_run), dataset="shakespeare_char", max_iters=14, lr_decay_iters=14
    )
    summary = train(cfg, {"init_from", "max_iters"})
    assert summary["iter"] == 14 and isinstance(summary["best_val_loss"], float)
    assert ckpt_io.load_checkpoint(nanogpt_run / "ckpt.pt")["tokenizer"] == "meta"  # recorded from now on


def test_checkpoints_that_record_their_tokenizer_never_read_the_dataset_folder(
    tiny_cfg, char_data, tmp_path, monkeypatch
):
    (tmp_path / "data" / "mine").mkdir(parents=True)
    for name in ("train.bin", "val.bin", "meta.pkl"):
        shutil.copy(char_data / name, tmp_path / "data" / "mine" / name)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(dataset="mine", max_iters=2, lr_decay_iters=2, eval_interval=2)
    train(cfg)
    (tmp_path / "data" / "mine" / "meta.pkl").write_bytes(b"garbage")  # the folder has changed since
    assert sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", num_samples=1, max_new_tokens=3, start="A"))


# --- nanoGPT's sliding window ------------------------------------------------------------------


def nanogpt_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate at top_k=1: the newest block_size tokens, recomputed for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def position_driven_model() -> GPT:
    """Random weights with large position embeddings: the next token depends on where it stands,
    so continuations part as soon as two ways of cutting the context place tokens differently."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.transformer.wpe.weight.normal_(0, 3.0)
    return model


def test_window_slide_gives_nanogpts_tokens_past_block_size():
    model = position_driven_model()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    reference = nanogpt_greedy(model, prompt, 60)  # far past the window
    assert torch.equal(model.generate(prompt, 60, temperature=0, window="slide"), reference)
    restarted = model.generate(prompt, 60, temperature=0)  # the default: KV cache, restarts at half a window
    assert torch.equal(restarted[:, :17], reference[:, :17])  # the same while the window is not yet full...
    assert not torch.equal(restarted, reference)  # ...then not


def test_sample_window_key(tmp_path):
    model = position_driven_model()
    chars = "abcdefghijk"
    meta = {"vocab_size": 11, "stoi": {c: i for i, c in enumerate(chars)}, "itos": dict(enumerate(chars))}
    state = {
        "model": model.state_dict(),
        "model_args": vars(model.config),
        "iter_num": 0,
        "config": {},
        **ckpt_io.tokenizer_record(meta),
    }
    ckpt_io.save_checkpoint(state, tmp_path / "ckpt.pt")
    kw = dict(out_dir=str(tmp_path), device="cpu", num_samples=1, max_new_tokens=40, start="cab", temperature=0.0)
    reference = nanogpt_greedy(model, torch.tensor([[2, 0, 1]]), 40)[0]
    assert sample(SampleConfig(window="slide", **kw)) == ["".join(chars[i] for i in reference)]
    assert sample(SampleConfig(**kw)) != sample(SampleConfig(window="slide", **kw))
    with pytest.raises(UserError, match="window must be"):
        SampleConfig(window="shift")


# --- meta.pkl from elsewhere -------------------------------------------------------------------


class _Trap:
    """Unpickling this calls open(path, 'w'): a file appears if the pickle is trusted."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_meta_pkl_that_would_run_code_is_refused(tiny_cfg, char_data, tmp_path, nanogpt_run):
    data = tmp_path / "shared_data"
    data.mkdir()
    for name in ("train.bin", "val.bin"):
        shutil.copy(char_data / name, data / name)
    marker = tmp_path / "pwned"
    meta = pickle.loads((char_data / "meta.pkl").read_bytes())
    (data / "meta.pkl").write_bytes(pickle.dumps({**meta, "x": _Trap(marker)}))
    before = (data / "meta.pkl").read_bytes()
    cfg = tiny_cfg(dataset=str(data))
    tiny = [f"--{k}={v}" for k, v in vars(cfg).items()]
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *tiny],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "would run code" in r.stderr and not marker.exists()
    with pytest.raises(UserError, match="would run code"):
        train(cfg)
    with pytest.raises(UserError, match="would run code"):  # a checkpoint without a vocabulary, pointed at it
        sample(SampleConfig(out_dir=str(nanogpt_run), dataset=str(data), device="cpu"))
    assert not marker.exists() and (data / "meta.pkl").read_bytes() == before


def test_nanogpts_meta_pkl_still_loads(tmp_path):
    from gptsmith import data as ds

    chars = sorted(set("First Citizen:\nBefore we proceed"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    for protocol in (2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
        assert ds.load_meta(tmp_path) == meta
