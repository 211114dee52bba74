"""Plot training curves from one or more runs' metrics.jsonl.

    python plot.py out-shakespeare-char                        # -> out-shakespeare-char/loss.png
    python plot.py out-a out-b --out=compare.png               # several runs on one chart

The code is gptsmith/metrics.py.
"""

from gptsmith.metrics import main

if __name__ == "__main__":
    main()
