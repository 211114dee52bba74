# A CPU speedrun: tiny Shakespeare, characters, to val loss <= 1.886 on the whole val split, fast on 2 cores.
#   python data/shakespeare_char/prepare.py
#   time python train.py config/shakespeare_char_speedrun.py
# nanoGPT's CPU recipe (4 layers, AdamW, cosine, 2000 steps) gets there in about 3.5 minutes on such a
# machine; this gets there in about 40 s (docs/benchmarks.md has the figures and an ablation of each choice).
# Two blocks are enough for this loss; rotary positions and QK-norm make the most of them, Muon makes each
# of 300 small steps count, and a long linear decay at the end (warmup-stable-decay) finishes the job.
# GELU beat ReLU^2 here (by 0.015 in val loss, three seeds each) and a tied head beat an untied one.

out_dir = "out-shakespeare-char-speedrun"
eval_interval = 100000  # evaluate once, at the end...
eval_at_start = False
eval_iters = 0  # ...on the whole val split
eval_train = False  # (the train split is ten times bigger)
log_interval = 50
always_save_checkpoint = False
plot = False
compile = False  # on a CPU, compiling takes longer than this whole run and the kernels are no faster
device = "cpu"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64

n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
activation = "gelu"
qk_norm = True
tie_weights = True

optimizer = "muon"
muon_lr = 0.02  # the blocks' matrices
learning_rate = 4e-3  # AdamW: the embedding (tied with the head) and the norm gains
weight_decay = 0.0
beta2 = 0.99
max_iters = 300
lr_decay_iters = 300
warmup_iters = 15
lr_schedule = "wsd"
decay_frac = 0.5
min_lr = 4e-4
