# Reproduce GPT-2 (124M) on OpenWebText, on one node of 8 GPUs:
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# The model itself is the default one: 12 layers, 12 heads, 768 wide, block_size 1024.

out_dir = "out-gpt2"
dataset = "openwebtext"

wandb_log = True
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 sequences x 1024 tokens x 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per step,
# about the 0.5M-token batch of the GPT-3 paper's small models.
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600k steps x 0.5M tokens = ~300B tokens.
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 2000
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
log_interval = 10
