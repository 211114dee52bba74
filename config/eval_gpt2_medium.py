# Evaluate OpenAI's GPT-2 350M on OpenWebText (no training): train/val loss go to
# out-eval-gpt2-medium/metrics.jsonl. OpenAI's weights reach a val loss of about 2.84.
#   python data/openwebtext/prepare.py
#   python train.py config/eval_gpt2_medium.py
# Offline the hub name fails: pass a local Hugging Face folder with --init_from=PATH.

init_from = "gpt2-medium"
out_dir = "out-eval-gpt2-medium"
dataset = "openwebtext"
eval_only = True  # estimate the losses once and exit; no checkpoint is written

batch_size = 8
eval_iters = 500  # 500 batches x 8 x 1024 = ~4M tokens per split, for a stable estimate
wandb_log = False
