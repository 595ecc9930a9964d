"""m2det-jax: M2Det (Zhao et al., AAAI 2019) in JAX/Flax."""

from m2det_jax.config import default_config, load_config
from m2det_jax.convert import convert_torch_state_dict
from m2det_jax.losses import multibox_loss
from m2det_jax.models import M2Det, build_model
from m2det_jax.postprocess import detect
from m2det_jax.priors import prior_boxes

__all__ = [
    "M2Det",
    "build_model",
    "convert_torch_state_dict",
    "default_config",
    "detect",
    "load_config",
    "multibox_loss",
    "prior_boxes",
]
