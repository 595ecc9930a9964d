"""Small building blocks shared by the backbones and the MLFPN (NHWC)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.config import REMAT_MODES


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU: the original's BasicConv (`conv`, `bn`)."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    relu: bool = True
    bn_momentum: float = 0.99
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-5,
            dtype=self.dtype,
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


@functools.cache
def remat_block(cls: type[nn.Module], remat: str, train_argnum: int | None = None):
    """`cls`, or `cls` under `nn.remat` for `train.remat` "stages" (keep nothing inside the
    block: only its inputs, i.e. the block boundaries) or "dots" (also keep conv / matmul
    outputs; BN and ReLU are recomputed). "none" and "full" (one remat around the whole
    network, see `M2Det`) return `cls` unchanged. Names and parameters do not change.
    `train_argnum` is the position of the Python-bool `train` argument, `self` being 0;
    it is static, so `train` must be passed positionally."""
    if remat not in REMAT_MODES:
        raise ValueError(f"train.remat={remat!r}: expected one of {REMAT_MODES}")
    if remat in ("none", "full"):
        return cls
    policy = jax.checkpoint_policies.dots_saveable if remat == "dots" else None
    static = () if train_argnum is None else (train_argnum,)
    return nn.remat(cls, static_argnums=static, policy=policy)


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's legacy 'nearest' source rows: floor(dst * (in / out)) in float32.

    3 -> 5 gives [0, 0, 1, 1, 2] (half-pixel nearest would give [0, 0, 1, 2, 2]).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, in_size - 1)


def upsample_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Nearest upsampling of [B, H, W, C] to `size` with the legacy PyTorch index rule."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    if size[0] == 2 * h and size[1] == 2 * w:  # plain 2x repeat, cheaper than a gather
        b, _, _, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    x = jnp.take(x, legacy_nearest_indices(h, size[0]), axis=1)
    return jnp.take(x, legacy_nearest_indices(w, size[1]), axis=2)


def max_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False):
    """Max pooling as torch.nn.MaxPool2d (padding with -inf, optional ceil mode)."""
    pads = []
    for n in x.shape[1:3]:
        extra = 0
        if ceil_mode:
            out = -(-(n + 2 * padding - window) // stride) + 1
            # PyTorch: the last window must start inside the (left-padded) input.
            if (out - 1) * stride >= n + padding:
                out -= 1
            extra = max((out - 1) * stride + window - (n + 2 * padding), 0)
        pads.append((padding, padding + extra))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
