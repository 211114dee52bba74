# The baby GPT: a character-level model of tiny Shakespeare, small enough for one GPU.
#   python data/shakespeare_char/prepare.py
#   python train.py config/shakespeare_char.py
# On a CPU, shrink it: README, "Start here", gives the command (4 layers, 128 wide, 64 characters).

out_dir = "out-shakespeare-char"
eval_interval = 250  # it overfits quickly, so check often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # ckpt.pt only when val loss improves (and on Ctrl-C/SIGTERM, to resume from)

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

# On one GPU, replay each step's forward and backward as CUDA graphs: a model this small otherwise
# waits on the host launching its ~300 kernels (H100: 5.9 ms a step against 9-13; docs/benchmarks.md).
# A CPU, DDP and FSDP compile it as usual.
compile_mode = "reduce-overhead"

learning_rate = 1e-3  # a small network can take a larger step
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # more tokens per step would allow 0.95; here batches are small
warmup_iters = 100
