"""Sample text from a trained model.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?"

Every key, its default and meaning: python sample.py --help
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import checkpoint as ckpt_io
import dataset as ds
from configurator import UserError, cli_errors, load_config, opt, show_progress
from model import GPT
from runtime import setup_runtime, teardown


@dataclass
class SampleConfig:
    """Sampling configuration."""

    init_from: str = opt(
        "resume",
        "'resume' = the checkpoint out_dir/ckpt, or pretrained GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
        "(Hugging Face hub) or the path of a local Hugging Face model folder",
    )
    out_dir: str = opt("out", "training output folder holding the checkpoint")
    ckpt: str = opt("ckpt.pt", "checkpoint file inside out_dir (ckpt.pt = latest saved, best.pt = best val loss)")
    dataset: str = opt(
        "",
        "only for checkpoints that do not record their vocabulary (nanoGPT's): the dataset (name under data/ or "
        "folder) whose meta.pkl decodes them; '' = the dataset they were trained on",
    )
    start: str = opt("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = opt(10, "number of samples to draw")
    batch_size: int = opt(
        10, "samples generated side by side (one forward pass for all); lower it if memory runs short"
    )
    max_new_tokens: int = opt(500, "tokens generated per sample")
    temperature: float = opt(0.8, "1.0 = as trained, lower = more conservative, 0 = greedy")
    top_k: int = opt(200, "sample only among the top_k most likely tokens; 0 = all")
    seed: int = opt(1337, "random seed")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: str = opt("auto", "auto, float32, bfloat16, float16")
    compile: bool = opt(False, "torch.compile the forward pass (pays off only for long generations)")
    window: str = opt(
        "restart",
        "past block_size tokens: 'restart' from the newest block_size/2 with the KV cache (fast), or 'slide' by one "
        "token, recomputing the newest block_size each time (nanoGPT's: its exact tokens, slower)",
    )

    def __post_init__(self) -> None:
        ckpt_io.check_init_from(self.init_from, ("resume",))
        for key in ("num_samples", "batch_size", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}")
        if self.temperature < 0:
            raise UserError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must not be negative, got {self.top_k}")
        if self.window not in ("restart", "slide"):
            raise UserError(f"window must be 'restart' or 'slide', got {self.window!r}")


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e}") from None


def load_model(cfg: SampleConfig) -> tuple[GPT, dict[str, Any] | None]:
    """The model to sample from and its vocabulary (None = GPT-2 BPE)."""
    if cfg.init_from != "resume":
        model = ckpt_io.load_pretrained(cfg.init_from)
        if model.config.vocab_size < ds.GPT2_BPE_TOKENS:  # e.g. a character-level model exported to Hugging Face
            raise UserError(
                f"{cfg.init_from} has a vocabulary of {model.config.vocab_size}, not GPT-2's BPE; "
                "sample from its gptsmith checkpoint instead (--out_dir)"
            )
        return model, None
    path = Path(cfg.out_dir) / cfg.ckpt
    state = ckpt_io.load_checkpoint(path)
    model = ckpt_io.model_from_checkpoint(state, path)
    return model, ckpt_io.checkpoint_vocab(state, path, cfg.dataset)


def sample(cfg: SampleConfig) -> list[str]:
    """Load the model, draw cfg.num_samples continuations of the prompt, return them."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    try:
        model, meta = load_model(cfg)
        model = model.to(rt.device).eval()
        encode, decode = ds.get_tokenizer(meta)
        ids = encode(read_prompt(cfg.start))
        if not ids:
            raise UserError("the prompt is empty; give --start some text")
        if cfg.compile:
            model.forward = torch.compile(model.forward, dynamic=True)  # generate() calls it per token
        torch.manual_seed(cfg.seed)
        prompt = torch.tensor(ids, dtype=torch.long, device=rt.device)[None, ...]  # (1, T)
        samples = []
        # Decoding a token reads every weight once whatever the batch, so a batch of samples costs
        # about what one does on a CPU and little more on a GPU.
        with torch.inference_mode(), rt.autocast():  # no autograd bookkeeping: ~6% faster decoding on CPU
            for first in range(0, cfg.num_samples, cfg.batch_size):
                n = min(cfg.batch_size, cfg.num_samples - first)
                bar = tqdm(total=cfg.max_new_tokens, desc=f"samples {first + 1}-{first + n}/{cfg.num_samples}",
                           unit="tok", leave=False, disable=not show_progress())  # fmt: skip
                y = model.generate(prompt.expand(n, -1), cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k or None, on_token=bar.update, window=cfg.window)  # fmt: skip
                bar.close()
                for row in y.tolist():
                    samples.append(decode(row))
                    print(samples[-1])
                    print("---------------", flush=True)
        return samples
    finally:
        teardown(rt)


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        sample(load_config(SampleConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
