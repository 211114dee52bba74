# Teach a small GPT 3-digit addition on a CPU in minutes (the quickest offline demo).
#   python data/addition/prepare.py
#   python train.py config/addition.py
#   python data/addition/evaluate.py --out_dir=out-addition
# An example is 13 tokens, '123+456=975$.' (the sum reversed, least significant digit first), and
# only the answer and its end marker '$' are targets; windows are whole examples, so block_size
# is the example length. Figures (3 seeds x 1 and 2 threads) in README, "Teach it arithmetic".

out_dir = "out-addition"
dataset = "addition"
eval_interval = 250
eval_iters = 4  # 4 x 128 fixed problems per split: the loss is only a progress signal, evaluate.py scores
log_interval = 50

gradient_accumulation_steps = 1
block_size = 13
batch_size = 128
n_layer = 2  # the carry needs no depth: each answer digit reads two operand digits and the digit before it
n_head = 4
n_embd = 128
dropout = 0.0  # a million distinct problems: nothing to overfit

# With AdamW alone the model sits on a plateau for hundreds of steps and then "gets" the carry
# suddenly, at a step that depends on the seed and on floating-point details (1 or 2 threads,
# AVX2 or AVX-512): some runs had not got there by step 2000. Muon's orthogonalised updates find
# it within ~250 steps on every seed tried, so 1000 steps leave a wide margin.
optimizer = "muon"
muon_lr = 0.02  # the blocks' matrices
learning_rate = 3e-3  # AdamW: the embedding (tied with the head) and the norm gains
weight_decay = 0.0
max_iters = 1000
lr_decay_iters = 1000
min_lr = 3e-4
warmup_iters = 100
beta2 = 0.99  # few tokens per step: a longer memory for the second moment

compile = False  # compiling takes longer than it saves in a few minutes of training on a CPU
