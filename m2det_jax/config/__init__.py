"""Configuration: `defaults` (every default, once), `load` (files, overrides, lock),
`checks` (allowed values and cross-field checks, run by every load)."""

from m2det_jax.config.checks import BACKBONES, METRICS, POSTPROCESS_METHODS, REMAT_MODES, validate
from m2det_jax.config.defaults import default_config, voc0712
from m2det_jax.config.load import (
           apply_overrides,
           config_from_json,
           configs_dir,
           load_config,
           run_config_file,
           shipped_configs,
)

__all__ = ["BACKBONES", "METRICS", "POSTPROCESS_METHODS", "REMAT_MODES", "apply_overrides",
           "config_from_json", "configs_dir", "default_config", "load_config",
           "run_config_file", "shipped_configs", "validate", "voc0712"]
