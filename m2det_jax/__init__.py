"""m2det-jax: M2Det (Zhao et al., AAAI 2019) in JAX/Flax."""

from m2det_jax.config import default_config, load_config
from m2det_jax.convert import convert_torch_state_dict
from m2det_jax.models import M2Det, build_model
from m2det_jax.priors import prior_boxes

__all__ = [
    "M2Det",
    "build_model",
    "convert_torch_state_dict",
    "default_config",
    "load_config",
    "prior_boxes",
]

try:  # pieces that land with the training / inference work
    from m2det_jax.losses import multibox_loss  # noqa: F401

    __all__.append("multibox_loss")
except ImportError:  # pragma: no cover
    pass
try:
    from m2det_jax.postprocess import detect  # noqa: F401

    __all__.append("detect")
except ImportError:  # pragma: no cover
    pass
