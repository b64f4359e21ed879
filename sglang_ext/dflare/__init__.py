"""Pure-PyTorch DFlare / DFlash drafter: config dialects, model, shared math, checkpoints.

No SGLang imports: the SGLang plugin reuses :mod:`sglang_ext.dflare.ops`.
"""

from sglang_ext.dflare.cache import RowKVCache
from sglang_ext.dflare.checkpoint import CheckpointError, load_drafter, save_drafter
from sglang_ext.dflare.config import DFlareConfig, DrafterConfigError, load_config, parse_config
from sglang_ext.dflare.model import DFlareDrafter

__all__ = [
    "CheckpointError",
    "DFlareConfig",
    "DFlareDrafter",
    "DrafterConfigError",
    "RowKVCache",
    "load_config",
    "load_drafter",
    "parse_config",
    "save_drafter",
]
