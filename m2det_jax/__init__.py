"""m2det-jax: M2Det (Zhao et al., AAAI 2019) in JAX/Flax.

The package is grouped by stage, each importing only the stages above it:

  errors, paths, distributed   process-wide: error types, local/remote paths, mesh
  core/         boxes, priors, preprocessing: pure functions
  config/       defaults (every default, once), loading (locked), checks
  data/         TFDS sources, decoding, host/device augmentation, the grain pipeline
  models/       backbones, MLFPN, the M2Det network, inference-only rewrites
  checkpoints/  orbax variables, training checkpoints, config fingerprints, PyTorch import
  inference/    post-processing (decode + soft-NMS), predict programs, detector, export
  evaluation/   streamed predictions -> COCO or VOC metrics
  train/        loss, optimizer, step, loop and what a run writes
  perf/         parameter/FLOP counts, compiled costs, speed benchmark, parity check
  cli           the `m2det` command
"""

from m2det_jax._compat import install_aliases
from m2det_jax.checkpoints.torch_convert import convert_torch_state_dict
from m2det_jax.config import default_config, load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.api import Detections, Detector
from m2det_jax.inference.postprocess import detect
from m2det_jax.models import M2Det, build_model
from m2det_jax.train.losses import multibox_loss

__getattr__ = install_aliases(__name__)

__all__ = [
    "Detections",
    "Detector",
    "M2Det",
    "build_model",
    "convert_torch_state_dict",
    "default_config",
    "detect",
    "load_config",
    "multibox_loss",
    "prior_boxes",
]
