"""gptsmith: a configurable trainer for GPT language models, in the nanoGPT style.

The commands (python train.py, sample.py, ... in a clone; gptsmith-train, gptsmith-sample, ...
after pip install; python -m gptsmith COMMAND) and the modules that own each part:

    model        GPT, GPTConfig, KVCache, generate (imports only torch)
    config       every command's keys, in groups declared once; configurator reads them
    runtime      device, dtype, autocast, process group, peak FLOP/s
    data         token files, meta.pkl, the seeded batch sampler, tokenizers
    prepare      what the data/<name>/prepare.py scripts share
    init_from    scratch, resume, auto, GPT-2 weights, another run's checkpoint
    checkpoint   atomic save/load, RNG state, sharded folders, consolidation
    optim        AdamW grouping, Muon, the learning-rate schedule
    parallel     DDP / FSDP2 wrapping, gradient sync, activation checkpointing
    metrics      metrics.jsonl and wandb, banner, summary, loss plots
    trainer      build_run, fit: the training loop
    sampler      sampling from a checkpoint or GPT-2
    hf           GPT-2 <-> Hugging Face, both directions
    bench        training-step and sampling speed
"""

__version__ = "0.2.0"
