"""The GPT model, where nanoGPT users look for it: `from model import GPT, GPTConfig` works in a clone.

The model itself is gptsmith/model.py (one file that imports only torch). This file re-exports it
rather than being it so that installing gptsmith puts one package, not a module named `model`,
into site-packages.
"""

from gptsmith.model import *  # noqa: F403
from gptsmith.model import GPT, GPTConfig, KVCache  # noqa: F401  (the names nanoGPT users reach for)
