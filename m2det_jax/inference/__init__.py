"""Inference: `postprocess/` (decode + soft-NMS on the device), `predict` (network +
post-processing as one jitted program, plain or TTA), `variables` (folded BatchNorm and
Winograd kernels for inference), `detector` (uint8 images of any size -> detections in
their pixels), `image_files` (`m2det detect`), `export` (`m2det export`)."""

from m2det_jax.inference.detector import make_detector, pad_batch, prepare_images, tta_passes
from m2det_jax.inference.predict import config_for_size, make_predict_fn, make_tta_fn, tta_sizes
from m2det_jax.inference.variables import prepare_variables, use_winograd

__all__ = ["config_for_size", "make_detector", "make_predict_fn", "make_tta_fn", "pad_batch",
           "prepare_images", "prepare_variables", "tta_passes", "tta_sizes", "use_winograd"]
