"""Hugging Face checkpoints in and out: `from_pretrained`, `save_pretrained` (see `api`)."""
from moe_jax.hf.api import (FAMILIES, config_from_hub, from_pretrained, hub_config,
                            read_hub_config, save_pretrained)
from moe_jax.hf.errors import CheckpointMismatchError, UnsupportedConfigError

__all__ = ["FAMILIES", "CheckpointMismatchError", "UnsupportedConfigError", "config_from_hub",
           "from_pretrained", "hub_config", "read_hub_config", "save_pretrained"]
