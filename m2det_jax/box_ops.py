"""Box operations shared by the loss and the decoder (pure jax.numpy).

Inside the project boxes are normalized [x1, y1, x2, y2]; priors are (cx, cy, w, h).
The formulas follow the original's utils/box_utils.py operation by operation, so float32
results (and therefore matching ties) agree with it (ORIGINAL.md §3, §4).
"""

from __future__ import annotations

import jax.numpy as jnp


def point_form(priors: jnp.ndarray) -> jnp.ndarray:
    """(cx, cy, w, h) -> (x1, y1, x2, y2) as centre -/+ wh/2.  # [..., 4]"""
    return jnp.concatenate(
        [priors[..., :2] - priors[..., 2:] / 2, priors[..., :2] + priors[..., 2:] / 2], axis=-1
    )


def iou(a: jnp.ndarray, b: jnp.ndarray, pixel_offset: float = 0.0) -> jnp.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes -> [N, M].

    Intersection from clamped min/max, union = area_a + area_b - inter, one divide: the
    original's float32 formula. `pixel_offset=1` is the legacy +1-pixel convention.
    """
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.maximum(rb - lt + pixel_offset, 0.0)
    # The max/clip guards stop XLA from fusing a product into the following add (FMA),
    # which would change the last bit versus the original's float arithmetic and with it
    # which prior wins an exactly tied match.
    inter = jnp.maximum(wh[..., 0] * wh[..., 1], 0.0)
    area_a = no_fma((a[:, 2] - a[:, 0] + pixel_offset) * (a[:, 3] - a[:, 1] + pixel_offset))
    area_b = no_fma((b[:, 2] - b[:, 0] + pixel_offset) * (b[:, 3] - b[:, 1] + pixel_offset))
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def no_fma(x: jnp.ndarray) -> jnp.ndarray:
    """Identity on finite float32 values that XLA cannot fuse into a multiply-add."""
    big = jnp.finfo(x.dtype).max
    return jnp.clip(x, -big, big)


def encode(matched: jnp.ndarray, priors: jnp.ndarray, variance=(0.1, 0.2)) -> jnp.ndarray:
    """Regression targets of xyxy boxes w.r.t. priors (cx, cy, w, h).  # [..., 4]"""
    g_cxcy = (matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]
    g_cxcy = g_cxcy / (variance[0] * priors[..., 2:])
    g_wh = (matched[..., 2:] - matched[..., :2]) / priors[..., 2:]
    g_wh = jnp.log(g_wh) / variance[1]
    return jnp.concatenate([g_cxcy, g_wh], axis=-1)


def decode(loc: jnp.ndarray, priors: jnp.ndarray, variance=(0.1, 0.2)) -> jnp.ndarray:
    """Regressions -> xyxy boxes (not clipped). x2y2 = x1y1 + wh, as the original.  # [..., 4]"""
    # The products are kept out of fused multiply-adds (`no_fma`), as in the original's
    # separate tensor ops, so every XLA program decodes a prior to the same float32 box.
    centre = priors[..., :2] + no_fma(loc[..., :2] * variance[0] * priors[..., 2:])
    wh = no_fma(priors[..., 2:] * jnp.exp(loc[..., 2:] * variance[1]))
    x1y1 = centre - wh / 2
    return jnp.concatenate([x1y1, x1y1 + wh], axis=-1)
