"""The one network-input preprocessing: channel order, pixel means, scale.

`normalize` is the only place the formula is written. The input pipeline sends uint8
RGB images, and every program applies it on the device: the train step
(`train.device_inputs`), evaluation and `m2det detect` (`inference.make_predict_fn` /
`make_tta_fn`) and the served function (`inference.export.make_serving_fn`). It takes numpy arrays
(returns numpy, on the host) or jax arrays (returns jax, e.g. inside a jitted step), with
the same float32 arithmetic either way (tested equal).

The original-compatible default feeds BGR pixels minus (104, 117, 123), unscaled
(docs/original.md §5.1).
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

CHANNEL_ORDERS = ("bgr", "rgb")


def normalize(images, channel_order: str = "bgr", means=(104.0, 117.0, 123.0), scale=1.0):
    """RGB pixels (uint8 or float) [..., 3] -> float32 (pixels in `channel_order` - means)
    / scale, means given in `channel_order`."""
    order = channel_order.lower()
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"preprocess.channel_order={channel_order!r}: 'bgr' or 'rgb'")
    xp = jnp if isinstance(images, jax.Array) else np
    x = images[..., ::-1] if order == "bgr" else images
    x = xp.asarray(x).astype(xp.float32) - xp.asarray(means, xp.float32)
    if scale != 1.0:
        x = x / xp.float32(scale)
    return x


def preprocess(images, cfg: ml_collections.ConfigDict):
    """`normalize` with the settings of `cfg.preprocess`."""
    p = cfg.preprocess
    return normalize(images, p.channel_order, tuple(p.pixel_means), float(p.pixel_scale))


def resize(image: np.ndarray, size: int | tuple[int, int], interpolation=cv2.INTER_LINEAR):
    """uint8 [H, W, 3] -> uint8 [size, size, 3] (or [h, w, 3] for size=(h, w)) by
    cv2.resize with `interpolation` (aspect not kept)."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[0] == h and image.shape[1] == w:
        return np.ascontiguousarray(image)
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interpolation)
