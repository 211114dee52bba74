"""What evaluate.py and calc.py share: the trained calculator, and problems put to it in batches.

The model does every step of the arithmetic. Python writes the prompt (the operands, zero-padded)
and reads back what the model wrote after '>' up to '.': parsing, nothing more.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import generated
from gptsmith.configurator import UserError
from gptsmith.model import GPT
from gptsmith.runtime import Runtime

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen  # noqa: E402  (data/calculator/generate.py, beside this file)

END = gen.meta["stoi"]["."]


@dataclass(frozen=True)
class Solution:
    """What the model wrote for one problem, and what it says the answer is ('' if it wrote no answer)."""

    prompt: str
    written: str  # the trace, '>', the answer, '.' (or whatever the model wrote instead)

    @property
    def answer(self) -> str:
        """The text between '>' and the first '.' after it; '' when either is missing."""
        _, sep, rest = self.written.partition(">")
        body, end, _ = rest.partition(".")
        return body if sep and end else ""


def load_calculator(path: Path) -> tuple[GPT, gen.Calculator]:
    """The checkpoint's model and the format it was trained on (the operands' width, and the longest
    operands it was trained on where they were narrower: data/calculator_beyond), after checking
    that it was trained on calculator problems."""
    state = ckpt_io.load_checkpoint(path)
    meta = state.get("meta") or {}
    if meta.get("stoi") != gen.meta["stoi"] or "calculator_width" not in meta:
        raise UserError(
            f"{path} was not trained on data/calculator (its vocabulary differs); "
            "train one with: python train.py config/calculator.py"
        )
    calc = gen.Calculator(meta["calculator_width"], meta.get("calculator_train_width"))
    return ckpt_io.model_from_checkpoint(state, path), calc


def solve(
    model: GPT, calc: gen.Calculator, problems: list[tuple[int, str, int]], rt: Runtime, batch_size: int = 500
) -> list[Solution]:
    """Each problem (a, op, b) answered by the model, greedily, batch_size at a time. The prompts all
    have one length, so a batch decodes together."""
    out = []
    for start in range(0, len(problems), batch_size):
        prompts = [calc.prompt(*p) for p in problems[start : start + batch_size]]
        x = torch.tensor([gen.encode(p) for p in prompts], dtype=torch.long, device=rt.device)  # (B, prompt_len)
        with torch.inference_mode(), rt.autocast():
            y = model.generate(x, model.config.block_size + 1 - x.size(1), temperature=0)
        for prompt, row in zip(prompts, y[:, x.size(1) :].tolist(), strict=True):
            out.append(Solution(prompt, decode_until_end(row)))
    return out


def decode_until_end(ids: list[int]) -> str:
    end = ids.index(END) + 1 if END in ids else len(ids)
    return "".join(gen.meta["itos"][i] for i in ids[:end])


def held_out_problems(calc: gen.Calculator, op: str, n: int, seed: int) -> list[tuple[int, str, int]]:
    """n distinct problems with this op from the held-out split (never trained on). Each operand's
    length is drawn uniformly (1 digit as often as 3), then the number; a problem drawn twice is
    drawn again, so short operands, of which there are few problems, come less often than that."""
    rng = np.random.default_rng([seed, gen.OPS.index(op)])
    seen, out = set(), []
    for _ in range(10_000 * n):
        problem = calc.draw(rng, op, balanced=True)
        key = generated.prompt_key(gen.encode(calc.prompt(*problem)))
        if problem not in seen and generated.is_held_out(key, gen.val_share):
            seen.add(problem)
            out.append(problem)
            if len(out) == n:
                return out
    raise UserError(f"found only {len(out)} held-out '{op}' problems; ask for fewer")
