# A CPU speedrun: tiny Shakespeare, characters, to val loss <= 1.886 on the whole val split, fast on 2 cores.
#   python data/shakespeare_char/prepare.py
#   time python train.py config/shakespeare_char_speedrun.py
# nanoGPT's CPU recipe (4 layers 128 wide, AdamW, cosine, 2000 steps) does not quite get there (1.897) and
# takes about 68 s in float32 on a 2-vCPU Zen 5 EPYC; this takes about 5.4 s there, in the bfloat16 that
# dtype=auto picks on that CPU (7 s in float32; docs/benchmarks.md has the figures, the search that led
# here and an ablation of each choice).
# Two blocks are enough for this loss; rotary positions and QK-norm make the most of them, Muon makes each
# of 450 small steps count, and the learning rate decays linearly over the last 70% (warmup-stable-decay;
# cosine did about as well).
# 64 wide, not 128: at this size a step's time goes more to running operations than to their arithmetic,
# and the narrower model runs about 2.5x the steps per second while needing 1.5x the steps (128 wide reaches
# a lower loss, in 2.3x the time). GELU beat ReLU^2 by 0.02-0.03 on three seeds.

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
n_head = 2
n_embd = 64
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
activation = "gelu"
qk_norm = True
tie_weights = True

optimizer = "muon"
muon_lr = 0.02  # the blocks' matrices
learning_rate = 8e-3  # AdamW: the embedding (tied with the head) and the norm gains
weight_decay = 0.0
beta2 = 0.99
max_iters = 450
lr_decay_iters = 450
warmup_iters = 15
lr_schedule = "wsd"
decay_frac = 0.7
min_lr = 4e-4
