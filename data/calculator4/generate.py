"""data/calculator's problems and traces one digit wider: operands 0..9999 (pushing the calculator further).

    python train.py config/calculator.py config/calculator4.py
    python data/calculator/evaluate.py --out_dir=out-calculator4
    python data/calculator/calc.py --out_dir=out-calculator4 "1234*5678"

The format is data/calculator/generate.py's (read it there) at width 4; only the width differs.
"""

from pathlib import Path

from gptsmith.generated import load_generator

_base = load_generator(Path(__file__).parents[1] / "calculator" / "generate.py", "calculator")

WIDTH = 4
CALCULATOR = _base.Calculator(WIDTH)
meta = {**_base.meta, "calculator_width": WIDTH}
block_size = CALCULATOR.block_size
example = CALCULATOR.example
val_share = _base.val_share
