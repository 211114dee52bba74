# Teach a small GPT 3-digit addition on a CPU in minutes (the quickest offline demo).
#   python data/addition/prepare.py
#   python train.py config/addition.py
#   python data/addition/evaluate.py --out_dir=out-addition
# An example is 13 tokens, '123+456=975$.' (the sum reversed, least significant digit first), and
# only the answer and its end marker '$' are targets; windows are whole examples, so block_size
# is the example length. Measured: 99.97% exact match on the 10,000 held-out problems, trained
# in 2 to 6.5 minutes wall on 2 CPU cores shared with other jobs (README, "Teach it arithmetic").

out_dir = "out-addition"
dataset = "addition"
eval_interval = 250
eval_iters = 4  # 4 x 128 fixed problems per split: the loss is only a progress signal, evaluate.py scores
log_interval = 50

block_size = 13
batch_size = 128
n_layer = 2  # the carry needs no depth: each answer digit reads two operand digits and the digit before it
n_head = 4
n_embd = 128
dropout = 0.0  # a million distinct problems: nothing to overfit

learning_rate = 5e-3  # a tiny model on a clean task takes large steps; the loss drops suddenly near step 600
max_iters = 1000
lr_decay_iters = 1000
min_lr = 5e-4
warmup_iters = 100
beta2 = 0.99  # few tokens per step: a longer memory for the second moment

compile = False  # compiling takes longer than it saves in a few minutes of training on a CPU
