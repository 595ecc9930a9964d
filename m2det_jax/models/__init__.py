"""Flax modules: backbones, MLFPN (FFMv1, FFMv2, TUM, SFAM) and the M2Det network; the
inference helpers (folded BatchNorm, Winograd convolutions) that run it unchanged."""

from m2det_jax.models.fold import apply_inference, fold_batchnorm
from m2det_jax.models.m2det import M2Det, abstract_variables, build_model
from m2det_jax.models.winograd import prepare_winograd

__all__ = ["M2Det", "abstract_variables", "apply_inference", "build_model", "fold_batchnorm",
           "prepare_winograd"]
