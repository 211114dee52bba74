# Finetune OpenAI's GPT-2 (124M) on tiny Shakespeare, tokenized with GPT-2's BPE.
#   python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare
# The architecture (and block_size 1024) comes from the pretrained weights; set block_size
# smaller to save memory. For the bigger models: --init_from=gpt2-xl (offline: a local folder).

init_from = "gpt2"
out_dir = "out-shakespeare"
dataset = "shakespeare"  # GPT-2 BPE tokens, no meta.pkl: the vocabulary GPT-2 was trained on

eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # the model overfits within a few dozen steps: keep only improvements

wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2"

# 1 sequence x 32 micro-steps x 1024 tokens = 32,768 tokens per step; the dataset is ~300k
# tokens, so 20 steps are about two epochs.
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# Finetuning wants a small, constant learning rate: large steps would wipe out what GPT-2 knows.
learning_rate = 3e-5
decay_lr = False
