"""Variables prepared for inference (evaluation, `m2det detect`, export, the benchmark):
BatchNorm folded into its convolution (`eval.fold_batchnorm`) and Winograd kernels for the
wide 3x3 convolutions (`eval.winograd`), replicated over the mesh. `model.apply` (training,
parity) never sees them.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from m2det_jax import distributed as shd
from m2det_jax.models import build_model
from m2det_jax.models.fold import fold_batchnorm
from m2det_jax.models.winograd import prepare_winograd


def use_winograd(cfg) -> bool:
    """cfg.eval.winograd resolved: "on", or "auto" on a CPU backend with a float32 model."""
    mode = cfg.eval.winograd
    return mode == "on" or (mode == "auto" and jax.default_backend() == "cpu"
                            and str(cfg.model.dtype) == "float32")  # fmt: skip


def prepare_variables(cfg, variables, mesh: Mesh | None = None) -> dict:
    """`variables` for inference: BatchNorm folded into the convolutions when
    cfg.eval.fold_batchnorm, Winograd kernels added when `use_winograd(cfg)` (planned for
    cfg.model.input_size; `apply_inference` runs either). Replicated on every device of
    `mesh` when given (folding returns host arrays)."""
    if cfg.eval.fold_batchnorm:
        variables = fold_batchnorm(variables)
    if use_winograd(cfg):
        s, e = int(cfg.model.input_size), cfg.eval
        variables = prepare_winograd(build_model(cfg), variables, (1, s, s, 3),
                                     min_channels=e.winograd_min_channels,
                                     min_pixels=e.winograd_min_pixels)  # fmt: skip
    if mesh is not None:
        variables = shd.replicate(jax.device_get(variables), mesh)
    return variables
