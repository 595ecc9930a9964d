"""Training augmentation and test-time resize on the host, with OpenCV (as the original).

`train_augment` is the original M2Det's training transform (its `preproc`), step by step
and in the same order:
  1. SSD crop: pick one of {keep the image, min IoU 0.1/0.3/0.5/0.7/0.9, unconstrained};
     try up to 50 random crops (side 0.3-1 of the image, aspect 1/2-2) for that mode and
     take the first whose IoU with every box reaches the mode and which holds at least
     one box centre (boxes with their centre inside are kept, clipped to the crop);
     redraw the mode if none passes;
  2. photometric distortion: brightness (+-32) and contrast (x0.5-1.5), each with
     probability 1/2 and truncated to uint8 after each, then OpenCV's uint8 HSV (hue
     0..179): hue +-18 and saturation x0.5-1.5, each with probability 1/2, and back;
  3. expand (zoom-out) with probability `expand_prob`: the image placed at random on a
     canvas up to 4x its size, filled with the pixel means;
  4. horizontal mirror with probability 1/2;
  5. resize to size x size with an interpolation drawn from cv2's linear, cubic, area,
     nearest and lanczos4;
  6. drop boxes with normalized min(w, h) <= 0.01; if none is left, fall back to the
     un-augmented image (resized with a new random interpolation) and its boxes.
An image without boxes is only resized. Every random draw comes from the
`np.random.Generator` passed in, so results are a function of its seed.

Where the time goes (cProfile, 640x480 JPEGs, input 320, one core; profiled ad hoc, the
shares are in docs/speed.md). The original's time goes mostly to building the expanded
canvas (up to 16x the pixels), resizing that canvas and its Python crop loop (one IoU call
per trial), the rest to decoding and to the float64 copies of brightness / contrast and the
HSV round trip. Here the 50 trials of a mode are tested at once; brightness and contrast are
one 256-entry lookup table (the same truncating arithmetic, exactly), hue and saturation
another; steps 3-5 never build the canvas: the image is resized straight into its place on a
size x size output filled with the means, and mirrored there. The placement is rounded to
whole output pixels and the boxes follow that rounded placement, so pixels and boxes agree
exactly; against resizing the full canvas only the pixels at the image's border differ. What
is left is decoding (`cv2.imdecode`, libjpeg-turbo), the two HSV conversions, the lookups
and the resize. Images per second per core, ours beside the original's: `python
benchmarks/input_pipeline.py --coco_like --original PATH`, rows "ours, train (host
augmentation)" and "original, train (imread + preproc)".

Images are uint8 RGB [H, W, 3] (OpenCV's HSV conversion gives the same H, S, V for RGB
input with the RGB codes as the original's BGR input with the BGR codes); boxes are
normalized [x1, y1, x2, y2]. The channel order and means of `cfg.preprocess` are applied
later, on the device (`m2det_jax.core.preprocess`).

`resize(image, size)` with the default INTER_LINEAR is the test-time resize, bit for bit
the original's `cv2.resize` (OpenCV's fixed-point bilinear, no antialiasing).
"""

from __future__ import annotations

import cv2
import numpy as np

from m2det_jax.core import box_ops
from m2det_jax.core.preprocess import resize

# Per-image work is small: OpenCV's own thread pool only adds overhead next to the
# pipeline's worker processes (and would oversubscribe the cores they use).
cv2.setNumThreads(1)

# The original's random choice, in its order.
INTERPOLATIONS = (
    cv2.INTER_LINEAR,
    cv2.INTER_CUBIC,
    cv2.INTER_AREA,
    cv2.INTER_NEAREST,
    cv2.INTER_LANCZOS4,
)
CROP_MODES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)  # None = keep the image as is
MIN_BOX_SIZE = 0.01  # normalized min(w, h) must exceed this (original preproc)
_IDENTITY = np.arange(256, dtype=np.float64)


def _iou_rects(boxes: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """IoU [T, N] of rects [T, 4] with boxes [N, 4] (pixels, no +1)."""
    lt = np.maximum(boxes[None, :, :2], rects[:, None, :2])
    rb = np.minimum(boxes[None, :, 2:], rects[:, None, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_r = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
    return inter / np.maximum(area_b[None] + area_r[:, None] - inter, 1e-12)


def random_crop(image, boxes, labels, rng: np.random.Generator, trials: int = 50):
    """SSD crop (boxes in pixels). Returns (image, boxes, labels), maybe unchanged.

    The original's 50 sequential trials per mode are drawn at once and the first that
    passes is taken: the same distribution, vectorised.
    """
    h, w = image.shape[:2]
    while True:
        mode = CROP_MODES[int(rng.integers(len(CROP_MODES)))]
        if mode is None:
            return image, boxes, labels
        scale = rng.uniform(0.3, 1.0, trials)
        lo, hi = np.maximum(0.5, scale * scale), np.minimum(2.0, 1.0 / (scale * scale))
        ratio = np.sqrt(rng.uniform(lo, hi))
        cw = (scale * ratio * w).astype(np.int64)
        ch = (scale / ratio * h).astype(np.int64)
        # random.randrange(W - w) in the original (which raises when cw == W).
        left = rng.integers(np.maximum(w - cw, 1))
        top = rng.integers(np.maximum(h - ch, 1))
        rects = np.stack([left, top, left + cw, top + ch], axis=1).astype(np.float32)
        iou = _iou_rects(boxes, rects)  # [T, N]
        centers = box_ops.xyxy_to_cxcywh(boxes)[:, :2]  # [N, 2]
        inside = ((rects[:, None, :2] < centers) & (centers < rects[:, None, 2:])).all(-1)
        ok = (cw >= 1) & (ch >= 1) & (iou.min(axis=1) >= mode) & inside.any(axis=1)
        if not ok.any():
            continue
        t = int(np.argmax(ok))
        rect, keep = rects[t], inside[t]
        b = boxes[keep].copy()
        b[:, :2] = np.maximum(b[:, :2], rect[:2]) - rect[:2]
        b[:, 2:] = np.minimum(b[:, 2:], rect[2:]) - rect[:2]
        x0, y0 = int(left[t]), int(top[t])
        return image[y0 : y0 + int(ch[t]), x0 : x0 + int(cw[t])], b, labels[keep]


def _truncate(lut: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """The original's `_convert` on a lookup table: v * alpha + beta, clipped to 0..255,
    written back to uint8 (which truncates)."""
    return np.floor(np.clip(lut * alpha + beta, 0.0, 255.0))


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast (RGB), hue, saturation (HSV); each with probability 1/2.

    The draws are the original's, in its order. The HSV round trip always happens, as
    in the original (it quantizes even when neither hue nor saturation changes).
    """
    lut = _IDENTITY
    if rng.integers(2):
        lut = _truncate(lut, beta=rng.uniform(-32, 32))
    if rng.integers(2):
        lut = _truncate(lut, alpha=rng.uniform(0.5, 1.5))
    img = image if lut is _IDENTITY else cv2.LUT(image, lut.astype(np.uint8))
    hue = _IDENTITY
    if rng.integers(2):
        hue = (hue + int(rng.integers(-18, 19))) % 180  # H stays in 0..179
    sat = _IDENTITY
    if rng.integers(2):
        sat = _truncate(sat, alpha=rng.uniform(0.5, 1.5))
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
    if hue is not _IDENTITY or sat is not _IDENTITY:
        table = np.stack([hue, sat, _IDENTITY], axis=-1).astype(np.uint8)[None]  # [1,256,3]
        hsv = cv2.LUT(hsv, table)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def expand_params(h: int, w: int, prob: float, rng: np.random.Generator):
    """The zoom-out's canvas (ch, cw) and the image's offset (top, left) on it, or None
    (skipped with probability 1 - prob, or 50 draws with a side below 1x)."""
    if rng.uniform() > prob:
        return None
    for _ in range(50):
        scale = rng.uniform(1.0, 4.0)
        lo, hi = max(0.5, 1.0 / (scale * scale)), min(2.0, scale * scale)
        ratio = np.sqrt(rng.uniform(lo, hi))
        ws, hs = scale * ratio, scale / ratio
        if ws < 1 or hs < 1:
            continue
        cw, ch = int(ws * w), int(hs * h)
        left = int(rng.integers(0, cw - w + 1))
        top = int(rng.integers(0, ch - h + 1))
        return ch, cw, top, left
    return None


def expand(image, boxes, fill_rgb, prob: float, rng: np.random.Generator):
    """Zoom-out with probability `prob`: image on a means-filled canvas up to 4x larger
    (the canvas itself; `train_augment` never builds it)."""
    h, w = image.shape[:2]
    params = expand_params(h, w, prob, rng)
    if params is None:
        return image, boxes
    ch, cw, top, left = params
    canvas = np.empty((ch, cw, 3), np.uint8)
    canvas[...] = np.asarray(fill_rgb, np.uint8)
    canvas[top : top + h, left : left + w] = image
    b = boxes.copy()
    b[:, :2] += (left, top)
    b[:, 2:] += (left, top)
    return canvas, b


def mirror(image, boxes, rng: np.random.Generator):
    """Horizontal flip with probability 1/2 (boxes in pixels)."""
    if rng.integers(2):
        w = image.shape[1]
        image = image[:, ::-1]
        boxes = boxes.copy()
        boxes[:, 0::2] = w - boxes[:, 2::-2]
    return image, boxes




def _expand_mirror_resize(img, boxes, size, fill_rgb, expand_prob, rng):
    """Steps 3-5 without the canvas: (uint8 [size, size, 3], boxes normalized)."""
    h, w = img.shape[:2]
    params = expand_params(h, w, expand_prob, rng)
    flip = bool(rng.integers(2))
    interp = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
    if params is None:
        out = resize(img, size, interp)
        b = boxes / np.array([w, h, w, h], np.float32)
    else:
        ch, cw, top, left = params
        # The image's place on the resized canvas, in whole output pixels.
        x0, x1 = round(left * size / cw), round((left + w) * size / cw)
        y0, y1 = round(top * size / ch), round((top + h) * size / ch)
        rw, rh = max(x1 - x0, 1), max(y1 - y0, 1)
        out = np.empty((size, size, 3), np.uint8)
        out[...] = np.asarray(fill_rgb, np.uint8)
        out[y0 : y0 + rh, x0 : x0 + rw] = resize(img, (rh, rw), interp)
        scale = np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        b = (boxes * scale + np.array([x0, y0, x0, y0], np.float32)) / np.float32(size)
    if flip:
        out = cv2.flip(out, 1)
        b = np.stack([1.0 - b[:, 2], b[:, 1], 1.0 - b[:, 0], b[:, 3]], axis=1)
    return out, b.astype(np.float32)


def train_augment(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    fill_rgb=(123, 117, 104),
    expand_prob: float = 0.6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """The original `preproc` (steps 1-6 above).

    Args:
      image: uint8 RGB [H, W, 3].
      boxes: float [N, 4] normalized [x1, y1, x2, y2]; labels [N].
      rng: the only source of randomness.
      size: output side.
      fill_rgb: expand canvas colour (the pixel means, RGB order).
      expand_prob: probability of the zoom-out (original p = 0.6).

    Returns:
      (uint8 RGB [size, size, 3], float32 boxes [M, 4] normalized, labels [M],
       fell_back) where fell_back says the un-augmented image was used.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels)
    if len(boxes) == 0:
        interp = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
        return resize(image, size, interp), boxes, labels, False
    h0, w0 = image.shape[:2]
    px = boxes * np.array([w0, h0, w0, h0], np.float32)
    img, b, lab = random_crop(image, px, labels, rng)
    img = photometric_distort(img, rng)
    out, b = _expand_mirror_resize(img, b, size, fill_rgb, expand_prob, rng)
    keep = box_ops.xyxy_to_xywh(b)[:, 2:].min(axis=1) > MIN_BOX_SIZE
    if not keep.any():
        interp = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
        return resize(image, size, interp), boxes, labels, True
    return out, np.clip(b[keep], 0.0, 1.0), lab[keep], False


def fill_rgb_from(channel_order: str, means) -> tuple[int, int, int]:
    """The expand fill colour in RGB from means given in `channel_order`."""
    m = [int(round(v)) for v in means]
    return tuple(m[::-1]) if channel_order.lower() == "bgr" else tuple(m)
