"""GPT-2 weights in and out: Hugging Face folders load with the same logits, finetune, resume,
sample and export back. A tiny random GPT2LMHeadModel stands in for OpenAI's weights (offline)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import hf, init_from
from gptsmith.config import ExportConfig, SampleConfig, TrainConfig
from gptsmith.configurator import UserError
from gptsmith.hf import export
from gptsmith.model import GPT, GPTConfig
from gptsmith.sampler import sample
from gptsmith.trainer import train
from helpers import ROOT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random GPT-2 saved as transformers saves OpenAI's (activation gelu_new, biases, tied head)."""
    torch.manual_seed(0)
    # Large initial weights make the MLP's inputs O(1), where exact GELU and GPT-2's tanh form
    # differ by ~1e-3 in the logits: a wrong activation would fail the 1e-4 comparisons.
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, initializer_range=0.2
    )
    path = tmp_path_factory.mktemp("hf-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory: pytest.TempPathFactory, play_path: Path, gpt2_bpe) -> Path:
    """GPT-2 BPE tokens of the first 100k characters of the made-up play: train.bin, val.bin, no meta.pkl."""
    import tiktoken

    text = play_path.read_text(encoding="utf-8")[:100_000]
    cut = int(len(text) * 0.9)
    enc = tiktoken.get_encoding("gpt2")
    out = tmp_path_factory.mktemp("shakespeare-bpe")
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        np.array(enc.encode_ordinary(part), dtype=np.uint16).tofile(out / f"{split}.bin")
    return out


def hf_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model.eval()(idx, torch.zeros_like(idx))  # with targets: logits at every position
    return logits


def finetune_cfg(hf: Path, data: Path, out: Path, **overrides) -> tuple[TrainConfig, set[str]]:
    """A TrainConfig from pretrained weights, and the keys it sets explicitly (as a config file would)."""
    settings = dict(
        init_from=str(hf),
        dataset=str(data),
        out_dir=str(out),
        block_size=32,
        batch_size=4,
        max_iters=3,
        eval_interval=3,
        eval_iters=2,
        log_interval=1,
        learning_rate=3e-5,
        decay_lr=False,
        device="cpu",
        compile=False,
        gradient_accumulation_steps=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings), set(settings)


def write_checkpoint(model: GPT, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "iter_num": 7, "config": {}}
    ckpt_io.save_checkpoint(state, out / "ckpt.pt")


# --- weights in ------------------------------------------------------------------------------


def test_from_pretrained_matches_transformers(hf_dir):
    model = GPT.from_pretrained(str(hf_dir))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 64, 50257)
    assert cfg.bias and cfg.gelu_approximate == "tanh" and cfg.dropout == 0.0
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, as GPT(config) has
    assert all(p.device.type == "cpu" and p.is_contiguous() and p.requires_grad for p in model.parameters())
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf_dir, idx), rtol=0, atol=1e-4)


def test_the_shapes_alone_come_from_the_config_without_reading_the_weights(hf_dir, monkeypatch):
    """What FSDP's other processes build: the model on the meta device, its weights left to rank 0."""
    monkeypatch.setattr(hf, "_read_hf_weights", lambda *a: pytest.fail("the weights were read"))
    model = hf.load_gpt2(str(hf_dir), weights=False)
    assert model.lm_head.weight.is_meta and model.lm_head.weight is model.transformer.wte.weight
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 32, 50257)


def test_only_dropout_may_be_overridden(hf_dir):
    assert GPT.from_pretrained(str(hf_dir), {"dropout": 0.1}).config.dropout == 0.1
    with pytest.raises(ValueError, match="only dropout"):
        GPT.from_pretrained(str(hf_dir), {"n_layer": 3})


def broken_folder(tmp_path: Path, kind: str, hf_dir: Path) -> Path:
    path = tmp_path / kind
    path.mkdir()
    if kind == "bert":
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif kind == "weights_only":
        (path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    elif kind == "config_only":
        (path / "config.json").write_text((hf_dir / "config.json").read_text())
    elif kind == "garbage_weights":
        (path / "config.json").write_text((hf_dir / "config.json").read_text())
        (path / "model.safetensors").write_bytes(b"not safetensors at all")
    elif kind == "other_activation":
        config = json.loads((hf_dir / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
        (path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("empty", "no config.json"),
        ("weights_only", "no config.json"),
        ("bert", "'bert' model, not GPT-2"),
        ("config_only", "cannot load the weights"),
        ("garbage_weights", "cannot load the weights"),
        ("other_activation", "activation_function='relu'"),
    ],
)
def test_folder_that_is_not_gpt2_is_refused(tmp_path, hf_dir, kind, message):
    with pytest.raises(UserError, match=message):
        init_from.load_pretrained(str(broken_folder(tmp_path, kind, hf_dir)))


def test_unknown_init_from_names_the_options():
    for make in (TrainConfig, SampleConfig):
        with pytest.raises(UserError, match=r"init_from must be .*'gpt2-xl', the path"):
            make(init_from="gpt9")


# --- finetuning ------------------------------------------------------------------------------


def test_finetune_resume_sample_export(hf_dir, bpe_data, tmp_path, capsys):
    cfg, explicit = finetune_cfg(hf_dir, bpe_data, tmp_path / "out")
    summary = train(cfg, explicit)
    assert summary["iter"] == 3 and np.isfinite(summary["val_loss"])
    state = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    args = state["model_args"]
    assert (args["n_layer"], args["n_embd"], args["vocab_size"], args["bias"]) == (2, 32, 50257, True)
    assert args["block_size"] == 32 and args["gelu_approximate"] == "tanh"  # cropped from 64; GPT-2's GELU kept

    # Resume: the architecture comes from the checkpoint, not TrainConfig's 12-layer defaults.
    resumed = train(dataclasses.replace(cfg, init_from="resume", max_iters=5), explicit)
    assert resumed["iter"] == 5

    texts = sample(SampleConfig(out_dir=cfg.out_dir, device="cpu", num_samples=1, max_new_tokens=8, start="ROMEO:"))
    assert texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")  # decoded as GPT-2 BPE
    texts = sample(SampleConfig(init_from=str(hf_dir), device="cpu", num_samples=1, max_new_tokens=8, start="Hi"))
    assert texts[0].startswith("Hi")
    capsys.readouterr()

    # The finetuned checkpoint exports to a folder transformers reads with the same logits.
    exported = export(ExportConfig(out_dir=cfg.out_dir, hf_dir=str(tmp_path / "hf")))
    model = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt"), "ckpt.pt")
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(exported, idx), our_logits(model, idx), rtol=0, atol=1e-4)


def test_eval_only_from_pretrained_writes_metrics_not_checkpoints(hf_dir, bpe_data, tmp_path):
    cfg, explicit = finetune_cfg(hf_dir, bpe_data, tmp_path / "eval", eval_only=True)
    summary = train(cfg, explicit)
    out = Path(cfg.out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0] and records[0]["val_loss"] == pytest.approx(summary["val_loss"])
    assert not list(out.glob("*.pt"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_layer=3), "--n_layer=3 conflicts with .*n_layer=2"),
        (dict(bias=False), "--bias=False conflicts"),
        (dict(block_size=128), "--block_size=128 conflicts .*only smaller"),
    ],
)
def test_architecture_overrides_that_conflict_are_refused(hf_dir, bpe_data, tmp_path, overrides, message):
    cfg, explicit = finetune_cfg(hf_dir, bpe_data, tmp_path / "out", **overrides)
    with pytest.raises(UserError, match=message):
        train(cfg, explicit)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_character_dataset_with_gpt2_is_refused(hf_dir, bpe_data, tmp_path):
    chars = tmp_path / "chars"
    chars.mkdir()
    for name in ("train.bin", "val.bin"):
        (chars / name).write_bytes((bpe_data / name).read_bytes())
    (chars / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65}))
    cfg, explicit = finetune_cfg(hf_dir, chars, tmp_path / "out")
    with pytest.raises(UserError, match="own vocabulary of 65"):
        train(cfg, explicit)


def test_cli_errors_are_one_line(tmp_path, hf_dir, capsys):
    import sample as sample_module

    bert = broken_folder(tmp_path, "bert", hf_dir)
    with pytest.raises(SystemExit) as exit_info:
        sample_module.main([f"--init_from={bert}", "--device=cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not GPT-2" in err
    # One real process, on the cheapest failure: export of a checkpoint that does not exist.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "export_hf.py", f"--out_dir={tmp_path / 'none'}", f"--hf_dir={tmp_path / 'hf'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: no checkpoint") and r.stderr.count("\n") == 1


# --- weights out -----------------------------------------------------------------------------


@pytest.mark.parametrize("bias,gelu,vocab", [(False, "none", 50304), (True, "tanh", 65)])
def test_export_round_trip(tmp_path, bias, gelu, vocab):
    torch.manual_seed(3)
    model = GPT(
        GPTConfig(block_size=24, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, bias=bias, gelu_approximate=gelu)
    )
    with torch.no_grad():  # move every weight, biases and norm gains included, off its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    write_checkpoint(model, tmp_path / "out")
    hf = export(ExportConfig(out_dir=str(tmp_path / "out"), hf_dir=str(tmp_path / "hf")))
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporary folder left behind

    idx = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(4))
    expected = our_logits(model, idx)
    torch.testing.assert_close(hf_logits(hf, idx), expected, rtol=0, atol=1e-4)
    back = GPT.from_pretrained(str(hf))
    assert back.config.bias and back.config.gelu_approximate == gelu
    torch.testing.assert_close(our_logits(back, idx), expected, rtol=0, atol=1e-4)


def test_export_refuses_missing_checkpoint_and_nonempty_folder(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        export(ExportConfig(out_dir=str(tmp_path / "nothing"), hf_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()

    torch.manual_seed(0)
    write_checkpoint(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)), tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty.*--overwrite=True"):
        export(ExportConfig(out_dir=str(tmp_path / "out"), hf_dir=str(taken)))
    assert (taken / "notes.txt").read_text() == "keep me"

    export(ExportConfig(out_dir=str(tmp_path / "out"), hf_dir=str(taken), overwrite=True))
    assert sorted(p.name for p in taken.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(UserError, match="hf_dir"):
        ExportConfig(out_dir=str(tmp_path / "out"))


def test_model_module_imports_only_torch():
    """transformers is imported inside GPT.from_pretrained, never when model.py loads."""
    tree = ast.parse((ROOT / "gptsmith" / "model.py").read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch"}
