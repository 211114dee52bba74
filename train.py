"""Train a GPT, nanoGPT-style.

    python train.py config/shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallel=fsdp

Every key, its default and meaning: python train.py --help. The loop is gptsmith/trainer.py.
"""

from gptsmith.trainer import main

if __name__ == "__main__":
    main()
