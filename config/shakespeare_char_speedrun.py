# A CPU speedrun: tiny Shakespeare, characters, target val loss <= 1.886 (whole val split) fast on 2 cores.
#   python data/shakespeare_char/prepare.py
#   time python train.py config/shakespeare_char_speedrun.py
# Small and shallow, short context, and the modern options that make few steps count: rotary positions,
# RMSNorm, ReLU^2, QK-norm, an untied head, Muon for the block matrices and a warmup-stable-decay schedule.

out_dir = "out-shakespeare-char-speedrun"
eval_interval = 100000  # evaluate only at the start and at the end (eval_iters=0: the whole splits)
eval_iters = 0
log_interval = 50
always_save_checkpoint = False
plot = False
compile = False  # compilation takes longer than the run on a CPU
device = "cpu"

dataset = "shakespeare_char"
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
activation = "relu2"
qk_norm = True
tie_weights = False

optimizer = "muon"
muon_lr = 0.02
learning_rate = 4e-3  # AdamW: embeddings, head, gains
weight_decay = 0.0
beta2 = 0.99
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
lr_schedule = "wsd"
decay_frac = 0.3
min_lr = 4e-4
