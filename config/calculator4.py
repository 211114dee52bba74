# The calculator one digit wider: + - * / on 0..9999 (data/calculator4: the same traces at width 4).
# An overlay on config/calculator.py, whose other keys it keeps:
#   python train.py config/calculator.py config/calculator4.py
#   python data/calculator/evaluate.py --out_dir=out-calculator4
#   python data/calculator/calc.py --out_dir=out-calculator4 "1234*5678"
out_dir = "out-calculator4"
dataset = "calculator4"
block_size = 178  # the generator's block_size: the longest example, a division (111 at width 3)
