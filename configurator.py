"""Config files and --key=value overrides, where nanoGPT users look for them.

    python train.py [CONFIG.py ...] [--key=value ...]

The code is gptsmith/configurator.py (the keys themselves: gptsmith/config.py); this file re-exports
it so that a clone keeps nanoGPT's layout without a top-level module in site-packages.
"""

from gptsmith.configurator import *  # noqa: F403
from gptsmith.configurator import UserError, load_config, read_overrides  # noqa: F401
