"""python -m gptsmith COMMAND [CONFIG.py ...] [--key=value ...]: the commands, without the scripts."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function)
COMMANDS = {
    "train": ("gptsmith.trainer", "main"),
    "sample": ("gptsmith.sampler", "main"),
    "bench": ("gptsmith.bench", "main"),
    "export_hf": ("gptsmith.hf", "main"),
    "consolidate": ("gptsmith.checkpoint", "consolidate_main"),
    "plot": ("gptsmith.metrics", "main"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = f" (got {argv[0]!r})" if argv and not argv[0].startswith("-") else ""
        print(f"usage: python -m gptsmith {{{','.join(COMMANDS)}}} [--key=value ...]{given}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, function = COMMANDS[argv[0]]
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
