"""Export a checkpoint as a Hugging Face GPT-2 model folder (config.json + model.safetensors).

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare

The folder loads with transformers.GPT2LMHeadModel.from_pretrained(hf_dir) and gives the
same logits as the checkpoint. Needs the hf extra: pip install 'gptsmith[hf]'.
Every key, its default and meaning: python export_hf.py --help
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import checkpoint as ckpt_io
import dataset as ds
from configurator import UserError, cli_errors, load_config, opt
from model import GPT, HF_CONV1D


@dataclass
class ExportConfig:
    """Export configuration."""

    out_dir: str = opt("out", "training output folder holding the checkpoint")
    ckpt: str = opt("ckpt.pt", "checkpoint file inside out_dir (ckpt.pt = latest saved, best.pt = best val loss)")
    hf_dir: str = opt("", "folder to write the Hugging Face model into (required)")
    overwrite: bool = opt(False, "replace hf_dir if it already exists and is not empty")

    def __post_init__(self) -> None:
        if not self.hf_dir:
            raise UserError("give the folder to write into: --hf_dir=DIR")


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights named and shaped as Hugging Face's GPT2LMHeadModel stores them."""
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers ties it again on loading
        tensors[name] = (p.t() if name.endswith(HF_CONV1D) else p).contiguous()
    if not model.config.bias:  # GPT-2 always has biases; zeros compute exactly the same function
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                tensors[f"{name}.bias"] = module.weight.new_zeros(module.out_features)
            elif isinstance(module, nn.LayerNorm):
                tensors[f"{name}.bias"] = module.weight.new_zeros(module.normalized_shape)
    return tensors


def hf_config(model: GPT) -> dict[str, object]:
    """GPT2Config arguments describing the model."""
    c = model.config
    bpe = c.vocab_size >= ds.GPT2_BPE_TOKENS  # only then is <|endoftext|> (50256) a token of this model
    return dict(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_pytorch_tanh" if c.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=ds.GPT2_BPE_TOKENS - 1 if bpe else None,
        eos_token_id=ds.GPT2_BPE_TOKENS - 1 if bpe else None,
        architectures=["GPT2LMHeadModel"],
    )


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint to cfg.hf_dir as a Hugging Face model folder; return the folder."""
    target = Path(cfg.hf_dir)
    if target.exists() and not target.is_dir():
        raise UserError(f"hf_dir {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"hf_dir {target} is not empty; choose another folder or pass --overwrite=True")
    path = Path(cfg.out_dir) / cfg.ckpt
    state = ckpt_io.load_checkpoint(path)
    model = ckpt_io.model_from_checkpoint(state, path)
    if (
        not model.config.is_gpt2()
    ):  # GPT2LMHeadModel has no rotary, RMSNorm, SwiGLU, ... : it would compute another function
        c = model.config
        options = dict(pos_emb=c.pos_emb, norm=c.norm, activation=c.activation, qk_norm=c.qk_norm,
                       n_kv_head=c.n_kv_head, tie_weights=c.tie_weights, logit_softcap=c.logit_softcap)  # fmt: skip
        raise UserError(
            f"{path} is not a GPT-2 architecture ({', '.join(f'{k}={v!r}' for k, v in options.items())}); "
            "only models with the default options (pos_emb='learned', norm='layernorm', activation='gelu', "
            "qk_norm=False, n_kv_head=None, tie_weights=True, logit_softcap=0) export as Hugging Face GPT-2"
        )
    try:
        from safetensors.torch import save_file
        from transformers import GPT2Config
    except ImportError:
        raise UserError("exporting needs transformers and safetensors: pip install 'gptsmith[hf]'") from None

    # Written beside the target and renamed when complete, so hf_dir is never half written.
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        GPT2Config(**hf_config(model)).save_pretrained(tmp)
        save_file(hf_tensors(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and target.exists():
            shutil.rmtree(old)
        elif old.exists():  # the swap failed halfway: put the previous export back
            old.rename(target)
    print(f"exported {path} (step {state['iter_num']}) to {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        export(load_config(ExportConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
