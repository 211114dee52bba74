# How accuracy falls beyond the trained range: the 4-digit layout (data/calculator_beyond), trained
# on operands 0..999 only, so that evaluate.py can pose 4-digit ones. An overlay on
# config/calculator.py, whose other keys it keeps:
#   python train.py config/calculator.py config/calculator_beyond.py
#   python data/calculator/evaluate.py --out_dir=out-calculator-beyond
out_dir = "out-calculator-beyond"
dataset = "calculator_beyond"
block_size = 178  # the 4-digit layout's longest example, a division
