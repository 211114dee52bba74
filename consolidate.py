"""Make one ordinary checkpoint file of a sharded (FSDP) checkpoint folder.

    python consolidate.py --out_dir=out-gpt2                  # ckpt.dcp -> ckpt.pt
    python consolidate.py --out_dir=out-gpt2 --ckpt=best.dcp  # best.dcp -> best.pt
    python sample.py --out_dir=out-gpt2

Training with parallel=fsdp writes checkpoints as folders (ckpt.dcp, best.dcp) holding one
shard file per process. This gathers them, in one process and without torchrun, into the
single-file layout train.py writes without FSDP, which sample.py, export_hf.py and a
resume with parallel=ddp (or one process) read. It reads any number of shards and changes
nothing in the folder, so it may run while training goes on.

Every key, its default and meaning: python consolidate.py --help
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import checkpoint as ckpt_io
from configurator import UserError, cli_errors, load_config, opt
from model import GPT, GPTConfig


@dataclass
class ConsolidateConfig:
    """Consolidation configuration."""

    out_dir: str = opt("out", "training output folder holding the sharded checkpoint")
    ckpt: str = opt(
        "ckpt.dcp", "sharded checkpoint folder inside out_dir: ckpt.dcp (latest) or best.dcp (best val loss)"
    )
    output: str = opt("", "file to write; '' = out_dir/<ckpt>.pt, e.g. ckpt.dcp -> ckpt.pt")
    optimizer: bool = opt(
        True, "include the optimizer state, so training can resume from the file; False = a third of the size"
    )

    def __post_init__(self) -> None:
        if not self.ckpt.endswith(ckpt_io.SHARDED_SUFFIX):
            raise UserError(
                f"ckpt must name a sharded checkpoint folder ending in {ckpt_io.SHARDED_SUFFIX}, got {self.ckpt!r}"
            )

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        return Path(self.out_dir) / (Path(self.ckpt).stem + ".pt")


def consolidate(cfg: ConsolidateConfig) -> Path:
    """Write the single-file checkpoint for cfg's sharded folder; return its path."""
    source = ckpt_io.readable_sharded(Path(cfg.out_dir) / cfg.ckpt)
    state = ckpt_io.load_train_state(source)
    model = _build_model(state, source)
    optimizer = _build_optimizer(model, state["config"]) if cfg.optimizer else None
    ckpt_io.load_sharded(source, model, optimizer)
    out = {"model": model.state_dict()}
    if optimizer is not None:
        out["optimizer"] = optimizer.state_dict()
    out.update({k: v for k, v in state.items() if k != "world_size"})  # the rest is as train.py saved it
    dest = cfg.output_path()
    if not dest.parent.is_dir():
        raise UserError(f"cannot write {dest}: no folder {dest.parent}")
    ckpt_io.save_checkpoint(out, dest)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {dest}: step {state['iter_num']}, {n_params / 1e6:.2f}M parameters"
        f"{', with optimizer state' if optimizer is not None else ''} "
        f"(from the shards of {state.get('world_size', '?')} processes)"
    )
    return dest


def _build_model(state: dict[str, Any], source: Path) -> GPT:
    try:
        return GPT(GPTConfig(**state["model_args"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {source} describes a model this version cannot build: {e}") from None


def _build_optimizer(model: GPT, config: dict[str, Any]) -> Any:
    """The optimizer train.py makes, so the saved state maps onto the same parameter groups."""
    betas = (config.get("beta1", 0.9), config.get("beta2", 0.95))
    return model.configure_optimizers(config.get("weight_decay", 0.1), config.get("learning_rate", 6e-4), betas, "cpu")


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        cfg = load_config(ConsolidateConfig, sys.argv[1:] if argv is None else argv)
        dest = consolidate(cfg)
        print(f"next: python sample.py --out_dir={dest.parent} --ckpt={dest.name}")


if __name__ == "__main__":
    main()
