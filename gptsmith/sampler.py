"""Sample text from a trained model.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?"

Every key, its default and meaning: python sample.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gptsmith import checkpoint as ckpt_io
from gptsmith import data as ds
from gptsmith.config import SampleConfig
from gptsmith.configurator import UserError, cli_errors, load_config, show_progress
from gptsmith.init_from import load_pretrained
from gptsmith.model import GPT
from gptsmith.runtime import Runtime, setup_runtime, teardown


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
        model = load_pretrained(cfg.init_from)
        if model.config.vocab_size < ds.GPT2_BPE_TOKENS:  # e.g. a character-level model exported to Hugging Face
            raise UserError(
                f"{cfg.init_from} has a vocabulary of {model.config.vocab_size}, not GPT-2's BPE; "
                "sample from its gptsmith checkpoint instead (--out_dir)"
            )
        return model, None
    path = cfg.checkpoint_path()
    state = ckpt_io.load_checkpoint(path)
    model = ckpt_io.model_from_checkpoint(state, path)
    return model, ckpt_io.checkpoint_vocab(state, path, cfg.dataset)


def sample(cfg: SampleConfig) -> list[str]:
    """Load the model, draw cfg.num_samples continuations of the prompt, return them."""
    rt = setup_runtime(cfg.device, cfg.dtype, sdpa_backend=cfg.sdpa_backend)
    try:
        model, meta = load_model(cfg)
        model = model.to(rt.device).eval()
        model.cast_for_inference(rt.ptdtype)
        encode, decode = ds.get_tokenizer(meta)
        ids = encode(read_prompt(cfg.start))
        if not ids:
            raise UserError("the prompt is empty; give --start some text")
        if cfg.compile:
            # The KV-cache decode step and its sampling, the same shapes at every token: compiled once, a
            # CUDA graph on GPUs. (The prompt's prefill, once per window, and window=slide's recomputation
            # run uncompiled.)
            model.compile_decode()
        torch.manual_seed(cfg.seed)
        prompt = torch.tensor(ids, dtype=torch.long, device=rt.device)[None, ...]  # (1, T)
        samples = []
        # Decoding a token reads every weight once whatever the batch, so a batch of samples costs
        # about what one does on a CPU and little more on a GPU.
        with torch.inference_mode(), rt.autocast():  # no autograd bookkeeping: ~6% faster decoding on CPU
            for first in range(0, cfg.num_samples, cfg.batch_size):
                n = min(cfg.batch_size, cfg.num_samples - first)
                bar = tqdm(
                    total=cfg.max_new_tokens,
                    desc=f"samples {first + 1}-{first + n}/{cfg.num_samples}",
                    unit="tok",
                    leave=False,
                    disable=not show_progress(),
                )
                y = model.generate(
                    prompt.expand(n, -1),
                    cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k or None,
                    on_token=bar.update,
                    window=cfg.window,
                )
                bar.close()
                for row in y.tolist():
                    samples.append(decode(row))
                    print(samples[-1])
                    print("---------------", flush=True)
        return samples
    finally:
        teardown(rt)


def eval_sample(model: GPT, meta: dict[str, Any] | None, max_new_tokens: int, rt: Runtime) -> str:
    """A short sample during training, from a fixed seed and start token, so samples of successive
    evaluations compare; its generator is its own, so it draws nothing from training's streams."""
    encode, decode = ds.get_tokenizer(meta)
    if meta is None:
        start = [ds.GPT2_BPE_TOKENS - 1]  # <|endoftext|>: a document starts after it
    else:
        start = encode("\n") if "\n" in meta.get("stoi", {}) else [0]
    x = torch.tensor([start], dtype=torch.long, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(1337)
    was_training = model.training
    model.eval()
    with torch.no_grad(), rt.autocast():
        y = model.generate(x, max_new_tokens, temperature=0.8, top_k=200, generator=generator)
    model.train(was_training)
    return decode(y[0, len(start) :].tolist())


def main(argv: list[str] | None = None) -> None:
    with cli_errors():
        sample(load_config(SampleConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
