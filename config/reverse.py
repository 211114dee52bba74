# Reverse strings of up to 8 digits, generated on the fly (data/reverse/generate.py): no prepare step.
#   python train.py config/reverse.py
#   python sample.py --out_dir=out-reverse --start="12345>" --max_new_tokens=6 --temperature=0 --num_samples=1
out_dir = "out-reverse"
dataset = "reverse"
device = "cpu"
compile = False
# float32 even where dtype=auto would pick bfloat16 (a CPU with bfloat16 units, 1.3x faster here): on a
# Zen 5 EPYC, seeds 1337, 1, 2, 3, 4 ended at val loss 0.0017-0.0062 (median 0.0019) in float32 but
# 0.0016-0.0359 (median 0.0116) in bfloat16, learning the reversal later (docs/benchmarks.md).
dtype = "float32"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
plot = False

gradient_accumulation_steps = 1
batch_size = 64
block_size = 17  # the generator's block_size

n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_emb = "rope"

optimizer = "muon"
learning_rate = 3e-3
weight_decay = 0.0
max_iters = 500
lr_decay_iters = 500
warmup_iters = 20
lr_schedule = "wsd"
min_lr = 3e-4
