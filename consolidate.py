"""Turn a sharded (FSDP) checkpoint folder into one ordinary ckpt.pt, in one process, no GPU needed.

    python consolidate.py --out_dir=out-gpt2                  # ckpt.dcp -> ckpt.pt
    python consolidate.py --out_dir=out-gpt2 --ckpt=best.dcp  # best.dcp -> best.pt

Every key: python consolidate.py --help. The code is gptsmith/checkpoint.py.
"""

from gptsmith.checkpoint import consolidate_main

if __name__ == "__main__":
    consolidate_main()
