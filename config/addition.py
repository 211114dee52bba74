# Teach a small GPT 3-digit addition, on a CPU in minutes (GitHub issue 7).
#   python data/addition/prepare.py
#   python train.py config/addition.py
#   python data/addition/evaluate.py --out_dir=out-addition
# Examples are 13 tokens ('123+456=975$.'), so block_size is 13 and windows are whole examples;
# only the reversed answer and its end marker are targets.

out_dir = "out-addition"
dataset = "addition"
eval_interval = 500
eval_iters = 8  # 8 x 256 = all 2,000 val problems (and 2,048 train ones)
log_interval = 100

block_size = 13
batch_size = 256
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
warmup_iters = 100
beta2 = 0.99  # small batches of tokens: a longer memory for the second moment

compile = False  # compiling takes longer than it saves in a run of a few minutes on a CPU
