"""Beyond the trained range: data/calculator's format at width 4, trained on operands 0..999 only.

    python train.py config/calculator.py config/calculator_beyond.py
    python data/calculator/evaluate.py --out_dir=out-calculator-beyond

The prompt has room for four digits, so evaluate.py can pose 4-digit operands (it draws every
length alike) to a model that never saw one: its report by the longest operand's digits says how
accuracy falls beyond the trained range. The format is data/calculator/generate.py's (read it there).
"""

from pathlib import Path

from gptsmith.generated import load_generator

_base = load_generator(Path(__file__).parents[1] / "calculator" / "generate.py", "calculator")

WIDTH, TRAIN_WIDTH = 4, 3
CALCULATOR = _base.Calculator(WIDTH, train_width=TRAIN_WIDTH)
meta = {**_base.meta, "calculator_width": WIDTH, "calculator_train_width": TRAIN_WIDTH}
block_size = CALCULATOR.block_size
example = CALCULATOR.example
val_share = _base.val_share
