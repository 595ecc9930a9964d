"""Box formats and box arithmetic: every conversion of the project lives here.

Formats (the last axis always has 4 entries):
  * xyxy: [x1, y1, x2, y2] -- the one format inside the project, normalized to [0, 1] or
    in pixels of the original image (detections).
  * cxcywh: [cx, cy, w, h] -- priors.
  * yxyx: TFDS's [ymin, xmin, ymax, xmax] (normalized), converted once at the data boundary.
  * xywh: COCO's [x, y, width, height] in pixels, only at the COCO boundary (annotation
    files and result rows).

The conversions take and return numpy arrays for numpy input and jax arrays for jax input
(they only index, add and stack), so the data pipeline (numpy) and the device code share
them. `iou`, `encode` and `decode` are jax.numpy: their float32 rounding is part of what
they compute (see `iou`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def xyxy_to_cxcywh(boxes):
    """[x1, y1, x2, y2] -> [cx, cy, w, h].  # [..., 4]"""
    xp = _xp(boxes)
    return xp.concatenate(
        [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], axis=-1
    )


def cxcywh_to_xyxy(boxes):
    """[cx, cy, w, h] -> [x1, y1, x2, y2] as centre -/+ wh / 2 (the original's point_form)."""
    xp = _xp(boxes)
    return xp.concatenate(
        [boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], axis=-1
    )


def yxyx_to_xyxy(boxes):
    """TFDS [ymin, xmin, ymax, xmax] -> [x1, y1, x2, y2] (a permutation, exact)."""
    return boxes[..., [1, 0, 3, 2]]


def xyxy_to_yxyx(boxes):
    """[x1, y1, x2, y2] -> TFDS [ymin, xmin, ymax, xmax]."""
    return boxes[..., [1, 0, 3, 2]]


def xywh_to_xyxy(boxes):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] (same units)."""
    xp = _xp(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def xyxy_to_xywh(boxes, pixel_offset: float = 0.0):
    """[x1, y1, x2, y2] -> COCO [x, y, w, h]; `pixel_offset=1` gives w = x2 - x1 + 1 (the
    original's COCO export, which counts both end pixels)."""
    xp = _xp(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2] + pixel_offset],
                          axis=-1)  # fmt: skip


def hflip_xyxy(boxes):
    """Normalized xyxy boxes of a horizontally flipped image -> the unflipped image's
    (x1' = 1 - x2, x2' = 1 - x1)."""
    xp = _xp(boxes)
    return xp.stack([1.0 - boxes[..., 2], boxes[..., 1], 1.0 - boxes[..., 0], boxes[..., 3]],
                    axis=-1)  # fmt: skip


def scale_xyxy(boxes, image_sizes):
    """Normalized xyxy [B, N, 4] times (width, height) of `image_sizes` [B, 2] (height,
    width) -> pixels. Kept out of a fused multiply-add with later differences (`no_fma`)."""
    hw = jnp.asarray(image_sizes).astype(jnp.float32)
    scale = jnp.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=-1)  # [B, 4]
    return no_fma(boxes * scale[:, None, :])


def no_fma(x: jnp.ndarray) -> jnp.ndarray:
    """Identity on finite float32 values that XLA cannot fuse into a multiply-add.

    XLA:CPU contracts `a * b + c` into one fused multiply-add (one rounding); the original's
    separate tensor ops round the product first. A clip to the finite range between the
    two keeps the product rounded, so float32 results agree with the original bit for bit.
    """
    big = jnp.finfo(x.dtype).max
    return jnp.clip(x, -big, big)


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
    # (loc * variance) is rounded before the product with the prior size, as the original's
    # left-to-right tensor ops do (XLA may otherwise reassociate the two products when the
    # priors are broadcast over a batch, which moves a box by an ulp).
    centre = priors[..., :2] + no_fma(no_fma(loc[..., :2] * variance[0]) * priors[..., 2:])
    wh = no_fma(priors[..., 2:] * jnp.exp(loc[..., 2:] * variance[1]))
    x1y1 = centre - wh / 2
    return jnp.concatenate([x1y1, x1y1 + wh], axis=-1)
