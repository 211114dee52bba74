"""GPT-2 and Hugging Face, both directions: OpenAI's weights in (GPT.from_pretrained,
init_from=gpt2...) and a checkpoint out as a Hugging Face GPT-2 folder (export_hf.py).

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare

Hugging Face's GPT2LMHeadModel keeps four of each block's weights in Conv1D layers, shaped
(in, out), the transpose of nn.Linear's; everything else maps by name. The exported folder
loads with transformers.GPT2LMHeadModel.from_pretrained(hf_dir) and gives the same logits as
the checkpoint. Needs the hf extra: pip install 'gptsmith[hf]'.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptsmith import checkpoint as ckpt_io
from gptsmith.config import ExportConfig
from gptsmith.configurator import UserError, cli_errors, load_config
from gptsmith.data import GPT2_BPE_TOKENS
from gptsmith.model import GPT, GPTConfig

# OpenAI's four GPT-2 sizes on the Hugging Face hub: 124M, 350M, 774M and 1558M parameters.
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Hugging Face's GPT-2 keeps these weights in Conv1D layers, shaped (in, out): nn.Linear's transpose.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face activation names this model can reproduce -> nn.GELU's approximate.
HF_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


# --- in: OpenAI's GPT-2 (or any Hugging Face GPT-2 folder) as a GPT ------------------------------


def load_gpt2(name_or_path: str, override_args: dict[str, Any] | None = None, weights: bool = True) -> GPT:
    """GPT-2 weights from the hub (one of GPT2_NAMES) or a local Hugging Face model folder; ValueError if unusable.
    weights=False: only the model's shapes, on the meta device, from the config alone."""
    override_args = override_args or {}
    if set(override_args) - {"dropout"}:
        raise ValueError(f"only dropout may be overridden, got {sorted(override_args)}")
    config, hf_config = _read_hf_config(name_or_path)
    config.dropout = override_args.get("dropout", 0.0)
    with torch.device("meta"):  # shapes only: drawing random weights to overwrite them costs time and a copy
        model = GPT(config)
    if not weights:
        return model
    sd, sd_hf = model.state_dict(), _read_hf_weights(name_or_path, hf_config)
    if sd.keys() != sd_hf.keys():
        unmatched = ", ".join(sorted(sd.keys() ^ sd_hf.keys())[:3])
        raise ValueError(f"the weights of {name_or_path} do not map onto GPT's: {unmatched}")
    weights = {}
    for key, param in sd.items():
        # transformers' Conv1D stores (in, out): transposed into nn.Linear's (out, in), the one copy
        # made; the other tensors are taken over as they are (the Hugging Face model is dropped).
        src = sd_hf[key].t().contiguous() if key.endswith(HF_CONV1D) else sd_hf[key]
        if src.shape != param.shape:
            raise ValueError(f"{name_or_path}: {key} is {tuple(src.shape)}, expected {tuple(param.shape)}")
        weights[key] = src
    model.load_state_dict(weights, assign=True)
    if config.tie_weights:  # assign made two parameters of the one matrix: one again, as GPT.__init__ ties it
        model.lm_head.weight = model.transformer.wte.weight
    model.init_buffers()
    return model


def pretrained(name_or_path: str, dropout: float = 0.0, weights: bool = True) -> GPT:
    """load_gpt2, its failures as UserError (for the commands)."""
    try:
        return load_gpt2(name_or_path, {"dropout": dropout}, weights=weights)
    except (ImportError, ValueError) as e:
        raise UserError(str(e)) from None


def _hint(name_or_path: str) -> str:
    if os.path.isdir(name_or_path):
        return ""
    return " (offline, give the path of a local Hugging Face model folder instead)"


def _read_hf_config(name_or_path: str) -> tuple[GPTConfig, Any]:
    """The GPTConfig of a Hugging Face GPT-2, and its transformers config; ValueError if it is not one."""
    try:  # imported here so that the model itself needs nothing but torch
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("loading pretrained weights needs transformers: pip install 'gptsmith[hf]'") from None
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"{name_or_path} has no config.json, so it is not a Hugging Face model folder")
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # no network, bad JSON, unknown model type: transformers raises many types
        raise ValueError(f"cannot read the config of {name_or_path}: {_first_line(e)}{_hint(name_or_path)}") from None
    return _config_from_hf(hf_config, name_or_path), hf_config


def _read_hf_weights(name_or_path: str, hf_config: Any) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face GPT-2, without causal-mask buffers; ValueError if incomplete."""
    from transformers import GPT2LMHeadModel  # slow to import, so only once the config is known to fit
    from transformers.utils import logging as hf_logging

    # From a local folder the loading bar is noise; from the hub it also shows the download, so it stays.
    quiet = os.path.isdir(name_or_path) and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, config=hf_config, output_loading_info=True)
    except Exception as e:  # missing or damaged weight files surface as OSError, SafetensorError, ...
        raise ValueError(f"cannot load the weights of {name_or_path}: {_first_line(e)}{_hint(name_or_path)}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:  # transformers would have filled them with random numbers
        raise ValueError(f"{name_or_path} lacks weights for {', '.join(sorted(info['missing_keys'])[:3])}")
    # Older transformers versions keep the causal mask as attn.bias / attn.masked_bias buffers.
    return {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def _config_from_hf(hf: Any, name: str) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config; ValueError for anything this model cannot reproduce."""
    if hf.model_type != "gpt2":
        raise ValueError(f"{name} holds a {hf.model_type!r} model, not GPT-2")
    unsupported = {
        "activation_function": hf.activation_function not in HF_GELU,
        "n_inner": hf.n_inner not in (None, 4 * hf.n_embd),
        "layer_norm_epsilon": hf.layer_norm_epsilon != 1e-5,  # nn.LayerNorm's default
        "tie_word_embeddings": not getattr(hf, "tie_word_embeddings", True),
        "scale_attn_weights": not hf.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": getattr(hf, "add_cross_attention", False),
    }
    bad = [f"{key}={getattr(hf, key, None)!r}" for key, unfit in unsupported.items() if unfit]
    if bad:
        raise ValueError(f"{name} is a GPT-2 variant this model cannot reproduce: {', '.join(bad)}")
    return GPTConfig(
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
        bias=True,
        gelu_approximate=HF_GELU[hf.activation_function],
    )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- out: a checkpoint as a Hugging Face GPT-2 folder ------------------------------------------


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
    bpe = c.vocab_size >= GPT2_BPE_TOKENS  # only then is <|endoftext|> (50256) a token of this model
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
        bos_token_id=GPT2_BPE_TOKENS - 1 if bpe else None,
        eos_token_id=GPT2_BPE_TOKENS - 1 if bpe else None,
        architectures=["GPT2LMHeadModel"],
    )


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint to cfg.hf_dir as a Hugging Face model folder; return the folder."""
    target = Path(cfg.hf_dir)
    if target.exists() and not target.is_dir():
        raise UserError(f"hf_dir {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"hf_dir {target} is not empty; choose another folder or pass --overwrite=True")
    path = cfg.checkpoint_path()
    state = ckpt_io.load_checkpoint(path)
    model = ckpt_io.model_from_checkpoint(state, path)
    if (
        not model.config.is_gpt2()
    ):  # GPT2LMHeadModel has no rotary, RMSNorm, SwiGLU, ... : it would compute another function
        c = model.config
        options = dict(
            pos_emb=c.pos_emb,
            norm=c.norm,
            activation=c.activation,
            qk_norm=c.qk_norm,
            n_kv_head=c.n_kv_head,
            tie_weights=c.tie_weights,
            logit_softcap=c.logit_softcap,
        )
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
