"""Training augmentation and eval preprocessing, in numpy + PIL.

`train_augment` reproduces the original M2Det's training transform (its `preproc`, in
data/data_augment.py), step by step and in the same order:
  1. SSD crop: pick one of {keep the image, min IoU 0.1/0.3/0.5/0.7/0.9, unconstrained};
     try up to 50 random crops (side 0.3-1 of the image, aspect 1/2-2) for that mode and
     take the first whose IoU with every box reaches the mode and which holds at least
     one box centre (boxes with their centre inside are kept, clipped to the crop);
     redraw the mode if none passes;
  2. photometric distort: brightness (+-32), contrast (x0.5-1.5), HSV hue (+-18 in
     OpenCV's uint8 hue 0..179) and saturation (x0.5-1.5), each with probability 1/2,
     every write truncated to uint8;
  3. expand (zoom-out) with probability `expand_prob`: the image placed at random on a
     canvas up to 4x its size, filled with the pixel means;
  4. horizontal mirror with probability 1/2;
  5. resize to size x size with a randomly chosen interpolation (PIL's bilinear,
     bicubic, box (= area), nearest, lanczos stand in for cv2's linear, cubic, area,
     nearest, lanczos4);
  6. drop boxes with normalized min(w, h) <= 0.01; if none is left, fall back to the
     un-augmented image (resized with the same interpolation) and its boxes.
An image without boxes is only resized. Every random draw comes from the
`np.random.Generator` passed in, so results are a function of its seed.

Images here are uint8 RGB [H, W, 3]; boxes are normalized [x1, y1, x2, y2]. The channel
order and mean subtraction of `cfg.preprocess` are applied last, by
`m2det_jax.preprocess.normalize` (in `data.iterator`, on the batch).

Deviations (documented, small): PIL's resampling antialiases when shrinking (cv2 does
not); eval uses `resize_bilinear`, a numpy port of cv2 INTER_LINEAR (half-pixel
centres, no antialiasing; within +-1 of cv2's fixed-point rounding). The HSV round trip
is skipped when neither hue nor saturation is changed (it would only quantize).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from m2det_jax import box_ops

# cv2 linear, cubic, area, nearest, lanczos4 -> PIL (the original's random choice).
INTERPOLATIONS = (
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.BOX,
    Image.Resampling.NEAREST,
    Image.Resampling.LANCZOS,
)
CROP_MODES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)  # None = keep the image as is
MIN_BOX_SIZE = 0.01  # normalized min(w, h) must exceed this (original preproc)


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


def rgb_to_hsv_cv2(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV as cv2.COLOR_RGB2HSV (H in 0..179, S and V in 0..255)."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    diff = v - x.min(axis=-1)
    s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1e-6), 0.0)
    d = np.maximum(diff, 1e-6)
    hue = np.where(
        v == r,
        60.0 * (g - b) / d,
        np.where(v == g, 120.0 + 60.0 * (b - r) / d, 240.0 + 60.0 * (r - g) / d),
    )
    hue = np.where(diff == 0, 0.0, hue)
    hue = np.where(hue < 0, hue + 360.0, hue) / 2.0
    out = np.stack([np.round(hue) % 180, np.round(s), v], axis=-1)
    return out.astype(np.uint8)


def hsv_to_rgb_cv2(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (cv2 convention) -> uint8 RGB, as cv2.COLOR_HSV2RGB."""
    x = hsv.astype(np.float32)
    h = x[..., 0] * 2.0 / 60.0  # sector units, 0..6
    s = x[..., 1] / 255.0
    v = x[..., 2]
    i = np.floor(h)
    f = h - i
    i = i.astype(np.int32) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack(c, axis=-1)
            for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
        ],
        axis=0,
    )  # [6, H, W, 3]
    rgb = np.take_along_axis(table, i[None, ..., None], axis=0)[0]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, hue, saturation; each step with probability 1/2."""
    img = image
    if rng.integers(2):
        img = np.clip(img.astype(np.float32) + rng.uniform(-32, 32), 0, 255).astype(np.uint8)
    if rng.integers(2):
        img = np.clip(img.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
    do_hue = bool(rng.integers(2))
    hue_shift = int(rng.integers(-18, 19)) if do_hue else 0
    do_sat = bool(rng.integers(2))
    sat = rng.uniform(0.5, 1.5) if do_sat else 1.0
    if do_hue or do_sat:
        hsv = rgb_to_hsv_cv2(img)
        if do_hue:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue_shift) % 180).astype(np.uint8)
        if do_sat:
            s = np.clip(hsv[..., 1].astype(np.float32) * sat, 0, 255)
            hsv[..., 1] = s.astype(np.uint8)
        img = hsv_to_rgb_cv2(hsv)
    return img


def expand(image, boxes, fill_rgb, prob: float, rng: np.random.Generator):
    """Zoom-out with probability `prob`: image on a means-filled canvas up to 4x larger."""
    if rng.uniform() > prob:
        return image, boxes
    h, w = image.shape[:2]
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
        canvas = np.empty((ch, cw, 3), np.uint8)
        canvas[...] = np.asarray(fill_rgb, np.uint8)
        canvas[top : top + h, left : left + w] = image
        b = boxes.copy()
        b[:, :2] += (left, top)
        b[:, 2:] += (left, top)
        return canvas, b
    return image, boxes


def mirror(image, boxes, rng: np.random.Generator):
    """Horizontal flip with probability 1/2 (boxes in pixels)."""
    if rng.integers(2):
        w = image.shape[1]
        image = image[:, ::-1]
        boxes = boxes.copy()
        boxes[:, 0::2] = w - boxes[:, 2::-2]
    return image, boxes


def resize(image: np.ndarray, size: int, interpolation=Image.Resampling.BILINEAR) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] with a PIL filter (aspect not kept)."""
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((size, size), resample=interpolation))


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) in numpy: half-pixel centres, no antialias, rounded uint8."""
    h, w = image.shape[:2]

    def coords(n_in):
        f = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        f = np.clip(f, 0, n_in - 1)
        i0 = np.floor(f).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (f - i0).astype(np.float32)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    img = image.astype(np.float32)
    rows = img[y0]  # [size, W, 3], separable: rows first, then columns
    rows += (img[y1] - rows) * fy[:, None, None]
    out = rows[:, x0]
    out += (rows[:, x1] - out) * fx[None, :, None]
    np.rint(out, out=out)  # a convex combination of uint8 values: no clipping needed
    return out.astype(np.uint8)


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
    img, b = expand(img, b, fill_rgb, expand_prob, rng)
    img, b = mirror(img, b, rng)
    h, w = img.shape[:2]
    interp = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
    out = resize(img, size, interp)
    b = (b / np.array([w, h, w, h], np.float32)).astype(np.float32)
    keep = box_ops.xyxy_to_xywh(b)[:, 2:].min(axis=1) > MIN_BOX_SIZE
    if not keep.any():
        return resize(image, size, interp), boxes, labels, True
    return out, np.clip(b[keep], 0.0, 1.0), lab[keep], False


def fill_rgb_from(channel_order: str, means) -> tuple[int, int, int]:
    """The expand fill colour in RGB from means given in `channel_order`."""
    m = [int(round(v)) for v in means]
    return tuple(m[::-1]) if channel_order.lower() == "bgr" else tuple(m)
