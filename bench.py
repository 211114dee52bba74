"""Measure speed: a bare training step, sampling with and without the KV cache, the matmul peak.

    python bench.py --what=train --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=64
    python bench.py --what=sample --device=cpu --n_layer=6 --n_head=6 --n_embd=384 --block_size=256
    python bench.py --what=peak

Every key: python bench.py --help. The code is gptsmith/bench.py.
"""

from gptsmith.bench import main

if __name__ == "__main__":
    main()
