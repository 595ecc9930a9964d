"""Training augmentation on the accelerator: batched, static-shape, jittable jax.numpy.

The on-device twin of `data.augment_host.train_augment` (the original M2Det `preproc`), run
inside the jitted train step when `data.augment_on_device` is set. The host only decodes
each image and pads it into a fixed uint8 canvas [C, C, 3] (content at the top-left
[:h, :w], zeros elsewhere) with its true (height, width). The steps, per image and in the
host path's order, with the same distributions (not the same bits):
  1. SSD crop: one of {keep, min IoU 0.1/0.3/0.5/0.7/0.9, unconstrained}, 50 trials of a
     crop of side 0.3-1 and aspect 1/2-2; a trial passes if its IoU with every box reaches
     the mode and it holds a box centre (strictly); boxes with their centre inside are
     kept, clipped to the crop;
  2. photometric distortion, each step with probability 1/2 and truncated to integers
     0..255 like a uint8 write: brightness +-32, contrast x0.5-1.5, then in OpenCV's uint8
     HSV hue +-18 (mod 180) and saturation x0.5-1.5;
  3. expand (zoom-out) with probability `expand_prob`: the image at a random integer
     offset on a canvas up to 4x its area, filled with `fill_rgb`;
  4. horizontal mirror with probability 1/2;
  5. resize to size x size (aspect not kept): bilinear (probability 4/5) or nearest;
  6. boxes normalized by the final image; those with min(w, h) <= 0.01 dropped; if none is
     left, the un-augmented image (bilinear, undistorted) with its original boxes.
An image without a valid box is only resized (interpolation still drawn).

`sample_params` draws every random quantity (the key split per purpose, each purpose one
batched draw of independent uniforms, so all images are independent) and
`apply_params` is deterministic, so tests (or callers) can edit the parameters in
between. Steps 1, 3, 4 and 5 are one composed inverse map per image: each output pixel is
taken back through the resize, the mirror and the expand canvas into the crop and then into
content pixels of the padded input, where its interpolation neighbours are read (clamped to
the crop, so padding never leaks in); neighbours off the placed image read the fill colour.
The 4x expand canvas is never materialised. The photometric steps are pixelwise, so they
are applied to exactly the source pixels that the resampling reads (before the fill is put
in and before blending): the fill is not distorted, as in the original. The cost is four
reads and four distortions per output pixel, whatever the zoom.

Deviations from the host path:
  * crop: the original redraws the mode until one succeeds; here `mode_draws` (8) modes are
    drawn with `trials` (50) trials each, the first that is "keep" or has a passing trial is
    used (its first passing trial); if none succeeds the image is kept uncropped;
  * expand: the original redraws an invalid (ws or hs < 1) zoom up to 50 times; here 8
    candidates (in exact arithmetic all are valid);
  * resize: only bilinear (half-pixel centres, as cv2 INTER_LINEAR, float rounding) and
    nearest (half-pixel centres, as cv2 INTER_NEAREST_EXACT; the original's INTER_NEAREST
    has no half-pixel offset); the original's cubic, area and lanczos4 choices are
    approximated by bilinear, none antialiases. The fallback image is always bilinear;
  * the distortion acts on the pixels read by the resampling (equal to distorting the
    crop first, since it is pixelwise) and its HSV round trip is in float32 (H and S
    rounded as uint8 storage would, not cv2's exact arithmetic: within a few levels); it is
    skipped when hue is 0 and saturation 1 (the host still round-trips a drawn 0 shift).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CROP_MIN_IOU = (math.nan, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)  # nan = keep the image
MIN_BOX_SIZE = 0.01  # normalized min(w, h) must exceed this (original preproc)
NEAREST_PROB = 0.2  # 1 of the original's 5 interpolations
EXPAND_CANDIDATES = 8

_F32 = jnp.float32
_I32 = jnp.int32


def _iou(boxes, rects):
    """IoU [..., G] of rects [..., 4] with boxes [G, 4] (pixels, no +1)."""
    r = rects[..., None, :]
    lt = jnp.maximum(boxes[:, :2], r[..., :2])
    rb = jnp.minimum(boxes[:, 2:], r[..., 2:])
    wh = jnp.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_r = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    return inter / jnp.maximum(area_b + area_r - inter, 1e-12)


def _centres_inside(boxes, rects):
    """[..., G]: the centre of each box lies strictly inside the rect [..., 4]."""
    ctr = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    r = rects[..., None, :]
    return ((r[..., :2] < ctr) & (ctr < r[..., 2:])).all(-1)


def _randint(u, n):
    """Integers uniform in [0, n) from uniforms u in [0, 1) (n >= 1, int32)."""
    return jnp.minimum(jnp.floor(u * n.astype(_F32)).astype(_I32), n - 1)


def _sample_crop(u_mode, u, hw, px, valid):
    """(crop [4], crop_mode []) for one image (boxes px in content pixels) from uniforms
    u_mode [M] (the modes) and u [4, M, T] (scale, ratio, left, top of every trial)."""
    h, w = hw[0].astype(_F32), hw[1].astype(_F32)
    mode_idx = _randint(u_mode, jnp.asarray(len(CROP_MIN_IOU), _I32))
    min_iou = jnp.asarray(CROP_MIN_IOU, _F32)[mode_idx]  # [M]
    scale = 0.3 + 0.7 * u[0]
    s2 = scale * scale
    lo, hi = jnp.maximum(0.5, s2), jnp.minimum(2.0, 1.0 / s2)
    ratio = jnp.sqrt(lo + (hi - lo) * u[1])
    cw = jnp.floor(scale * ratio * w).astype(_I32)
    ch = jnp.floor(scale / ratio * h).astype(_I32)
    # random.randrange(W - w) in the original (max 1: randrange(0) would raise).
    left = _randint(u[2], jnp.maximum(hw[1] - cw, 1))
    top = _randint(u[3], jnp.maximum(hw[0] - ch, 1))
    rects = jnp.stack([left, top, left + cw, top + ch], axis=-1).astype(_F32)  # [M, T, 4]
    iou = jnp.where(valid, _iou(px, rects), jnp.inf).min(-1)  # [M, T]
    inside = (_centres_inside(px, rects) & valid).any(-1)
    ok = (cw >= 1) & (ch >= 1) & (iou >= min_iou[:, None]) & inside
    draw_ok = (mode_idx == 0) | ok.any(-1)
    d = jnp.argmax(draw_ok)
    keep = ~valid.any() | ~draw_ok.any() | (mode_idx[d] == 0)
    rect = rects[d, jnp.argmax(ok[d])]
    crop = jnp.where(keep, jnp.stack([0.0, 0.0, w, h]), rect)
    return crop, jnp.where(keep, jnp.nan, min_iou[d])


def _sample_one(u, hw, boxes, valid, expand_prob):
    """The parameters of one image from its uniforms `u` (a dict, see `sample_params`)."""
    has_box = valid.any()
    h, w = hw[0].astype(_F32), hw[1].astype(_F32)
    px = boxes * jnp.stack([w, h, w, h])
    crop, crop_mode = _sample_crop(u["mode"], u["trial"], hw, px, valid)

    up = u["photo"]  # 4 on/off draws, then brightness, contrast, hue, saturation
    on = (up[:4] < 0.5) & has_box
    brightness = jnp.where(on[0], -32.0 + 64.0 * up[4], 0.0)
    contrast = jnp.where(on[1], 0.5 + up[5], 1.0)
    hue = jnp.where(on[2], _randint(up[6], jnp.asarray(37, _I32)) - 18, 0)
    saturation = jnp.where(on[3], 0.5 + up[7], 1.0)

    ue = u["expand"]  # E scales, E aspect draws, on/off, left, top
    n = EXPAND_CANDIDATES
    es = 1.0 + 3.0 * ue[:n]
    es2 = es * es
    lo, hi = jnp.maximum(0.5, 1.0 / es2), jnp.minimum(2.0, es2)
    er = jnp.sqrt(lo + (hi - lo) * ue[n : 2 * n])
    ws, hs = es * er, es / er
    cand = (ws >= 1.0) & (hs >= 1.0)
    e = jnp.argmax(cand)
    do_expand = (ue[2 * n] < expand_prob) & cand.any() & has_box
    ratios = jnp.where(do_expand, jnp.stack([ws[e], hs[e]]), jnp.ones(2, _F32))
    crop_wh = jnp.stack([crop[2] - crop[0], crop[3] - crop[1]]).astype(_I32)
    canvas_wh = jnp.floor(ratios * crop_wh.astype(_F32)).astype(_I32)
    off = _randint(ue[2 * n + 1 :], canvas_wh - crop_wh + 1)
    offset = jnp.where(do_expand, off, 0).astype(_F32)

    return {
        "crop": crop,
        "crop_mode": crop_mode,
        "brightness": brightness.astype(_F32),
        "contrast": contrast.astype(_F32),
        "hue": hue.astype(_I32),
        "saturation": saturation.astype(_F32),
        "expand": ratios,
        "expand_offset": offset,
        "mirror": (u["flip"][0] < 0.5) & has_box,
        "nearest": u["flip"][1] < NEAREST_PROB,
    }


def sample_params(key, image_sizes, boxes, valid, *, expand_prob=0.6, trials=50, mode_draws=8):
    """Every random draw of the augmentation, per image.

    Args:
      key: a jax PRNG key (split per purpose).
      image_sizes: int32 [B, 2] (height, width) of the content in the canvas.
      boxes: float32 [B, G, 4] normalized [x1, y1, x2, y2] relative to the content.
      valid: bool [B, G].
      expand_prob, trials, mode_draws: static Python numbers (see the module docstring).

    Returns:
      dict of per-image arrays: "crop" float32 [B, 4] (x1, y1, x2, y2) in content pixels
      (the whole content if not cropped); "crop_mode" float32 [B] (min IoU of the mode
      used, nan = keep, -inf = unconstrained); "brightness" [B] (0 = off), "contrast" [B]
      (1 = off), "hue" int32 [B] (0 = off), "saturation" [B] (1 = off); "expand" float32
      [B, 2] (ws, hs) canvas / image ratios (1, 1 = off); "expand_offset" float32 [B, 2]
      (left, top) in pixels of the cropped image; "mirror" bool [B]; "nearest" bool [B].
      Images without a valid box get identity parameters (only "nearest" is drawn).
    """
    image_sizes = jnp.asarray(image_sizes, _I32)
    n = image_sizes.shape[0]
    # One key per purpose, each drawing all images' uniforms at once (independent entries;
    # cheaper to compile than per-image keys under vmap).
    shapes = {
        "mode": (n, mode_draws),
        "trial": (n, 4, mode_draws, trials),
        "photo": (n, 8),
        "expand": (n, 2 * EXPAND_CANDIDATES + 3),
        "flip": (n, 2),
    }
    keys = dict(zip(shapes, jax.random.split(key, len(shapes)), strict=True))
    u = {k: jax.random.uniform(keys[k], s, _F32) for k, s in shapes.items()}
    fn = lambda uu, hw, b, v: _sample_one(uu, hw, b, v, expand_prob)  # noqa: E731
    return jax.vmap(fn)(u, image_sizes, jnp.asarray(boxes, _F32), jnp.asarray(valid, bool))


def _hue_saturation(x, hue, saturation):
    """Float RGB [..., 3] (integers 0..255) through cv2's uint8 HSV: hue shift, sat scale."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    diff = v - x.min(-1)
    s = jnp.round(jnp.where(v > 0, diff * 255.0 / jnp.maximum(v, 1e-6), 0.0))
    d = jnp.maximum(diff, 1e-6)
    deg = jnp.where(
        v == r,
        60.0 * (g - b) / d,
        jnp.where(v == g, 120.0 + 60.0 * (b - r) / d, 240.0 + 60.0 * (r - g) / d),
    )
    deg = jnp.where(diff == 0, 0.0, deg)
    deg = jnp.where(deg < 0, deg + 360.0, deg)
    h = jnp.mod(jnp.mod(jnp.round(deg * 0.5), 180.0) + hue, 180.0)  # cv2's H: 0..179
    s = jnp.floor(jnp.clip(s * saturation, 0.0, 255.0)) / 255.0
    sector = h / 30.0  # degrees / 60

    def channel(n):
        k = jnp.mod(n + sector, 6.0)
        return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    rgb = jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)
    return jnp.clip(jnp.round(rgb), 0.0, 255.0)


def _photometric(x, brightness, contrast, hue, saturation):
    """The pixelwise distortion on float RGB [..., 3] holding integers 0..255."""
    x = jnp.floor(jnp.clip(x + brightness, 0.0, 255.0))
    x = jnp.floor(jnp.clip(x * contrast, 0.0, 255.0))
    hsv = (hue != 0) | (saturation != 1.0)
    return jnp.where(hsv, _hue_saturation(x, hue.astype(_F32), saturation), x)


def _axis_map(size, n_canvas, offset, lo, hi, nearest, n_input):
    """Along one axis: for each output index, the two neighbours' input indices, whether
    they lie on the placed image, and the weight of the second one.

    n_canvas: the (expanded) image length; offset: where the crop starts in it; [lo, hi):
    the crop in content pixels; n_input: the padded canvas side (for safe indexing).
    """
    u = jnp.arange(size, dtype=_F32)
    x = (u + 0.5) * (n_canvas.astype(_F32) / size) - 0.5  # half-pixel centres
    x = jnp.clip(x, 0.0, (n_canvas - 1).astype(_F32))
    i0 = jnp.floor(x).astype(_I32)
    i1 = jnp.minimum(i0 + 1, n_canvas - 1)
    f = x - i0.astype(_F32)
    f = jnp.where(nearest, (f >= 0.5).astype(_F32), f)

    def to_input(i):
        on = (i >= offset) & (i < offset + hi - lo)
        src = jnp.clip(i - offset + lo, lo, hi - 1)
        return jnp.clip(src, 0, n_input - 1), on

    (s0, on0), (s1, on1) = to_input(i0), to_input(i1)
    return s0, s1, on0, on1, f


def _render(image, p, canvas_wh, size, fill):
    """One output image [size, size, 3] float32 (integers) from the padded input canvas."""
    crop = jnp.round(p["crop"]).astype(_I32)
    offset = jnp.round(p["expand_offset"]).astype(_I32)
    n_in = image.shape[0]
    sx0, sx1, onx0, onx1, fx = _axis_map(
        size, canvas_wh[0], offset[0], crop[0], crop[2], p["nearest"], image.shape[1]
    )
    sy0, sy1, ony0, ony1, fy = _axis_map(
        size, canvas_wh[1], offset[1], crop[1], crop[3], p["nearest"], n_in
    )
    # Mirror = flip the output columns (the resampling kernels are symmetric).
    flip = lambda a: jnp.where(p["mirror"], a[::-1], a)  # noqa: E731
    sx0, sx1, onx0, onx1, fx = flip(sx0), flip(sx1), flip(onx0), flip(onx1), flip(fx)
    rows0, rows1 = image[sy0], image[sy1]  # [size, C, 3]
    pix = jnp.stack([rows0[:, sx0], rows0[:, sx1], rows1[:, sx0], rows1[:, sx1]]).astype(_F32)
    pix = _photometric(pix, p["brightness"], p["contrast"], p["hue"], p["saturation"])
    on = jnp.stack(
        [
            ony0[:, None] & onx0[None, :],
            ony0[:, None] & onx1[None, :],
            ony1[:, None] & onx0[None, :],
            ony1[:, None] & onx1[None, :],
        ]
    )
    pix = jnp.where(on[..., None], pix, jnp.asarray(fill, _F32))
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = pix[0] + (pix[1] - pix[0]) * fx
    bottom = pix[2] + (pix[3] - pix[2]) * fx
    return jnp.clip(jnp.round(top + (bottom - top) * fy), 0.0, 255.0)


def _apply_one(p, image, hw, boxes, labels, valid, size, fill):
    h, w = hw[0].astype(_F32), hw[1].astype(_F32)
    crop = p["crop"]
    crop_wh = jnp.stack([crop[2] - crop[0], crop[3] - crop[1]])
    canvas_wh = jnp.floor(p["expand"] * crop_wh).astype(_I32)
    cwh = canvas_wh.astype(_F32)

    px = boxes * jnp.stack([w, h, w, h])
    kept = valid & (jnp.isnan(p["crop_mode"]) | _centres_inside(px, crop))
    shift = jnp.tile(p["expand_offset"] - crop[:2], 2)
    b = jnp.clip(px, jnp.tile(crop[:2], 2), jnp.tile(crop[2:], 2)) + shift
    b = b / jnp.tile(cwh, 2)
    b = jnp.where(p["mirror"], jnp.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], -1), b)
    big = jnp.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) > MIN_BOX_SIZE
    new_valid = kept & big
    fell_back = valid.any() & ~new_valid.any()
    out_valid = jnp.where(fell_back, valid, new_valid)
    out_boxes = jnp.where(fell_back, boxes, b)
    out_boxes = jnp.where(out_valid[:, None], jnp.clip(out_boxes, 0.0, 1.0), 0.0)

    # The fallback is the un-augmented image: identity parameters, bilinear.
    whole = jnp.stack([0.0, 0.0, w, h])
    q = dict(p)
    q["crop"] = jnp.where(fell_back, whole, crop)
    q["expand_offset"] = jnp.where(fell_back, 0.0, p["expand_offset"])
    q["brightness"] = jnp.where(fell_back, 0.0, p["brightness"])
    q["contrast"] = jnp.where(fell_back, 1.0, p["contrast"])
    q["hue"] = jnp.where(fell_back, 0, p["hue"])
    q["saturation"] = jnp.where(fell_back, 1.0, p["saturation"])
    q["mirror"] = p["mirror"] & ~fell_back
    q["nearest"] = p["nearest"] & ~fell_back
    canvas_wh = jnp.where(fell_back, jnp.stack([hw[1], hw[0]]), canvas_wh)
    return {
        "image": _render(image, q, canvas_wh, size, fill),
        "boxes": out_boxes,
        "labels": jnp.where(out_valid, labels, 0).astype(_I32),
        "valid": out_valid,
        "fell_back": fell_back,
    }


def apply_params(params, images, image_sizes, boxes, labels, valid, *, size, fill_rgb):
    """Apply `sample_params`' draws: deterministic, batched, static shapes.

    Args:
      params: the dict of `sample_params` (possibly edited).
      images: uint8 [B, C, C, 3] RGB canvases, content at [:h, :w].
      image_sizes: int32 [B, 2] (height, width); boxes float32 [B, G, 4] normalized to the
        content; labels int32 [B, G]; valid bool [B, G].
      size: output side (static); fill_rgb: 3 ints, the expand fill colour (static).

    Returns:
      {"image": float32 [B, size, size, 3] RGB, integers in [0, 255]; "boxes": float32
       [B, G, 4] normalized to the output, in [0, 1] (zero in invalid slots); "labels"
       int32 [B, G] (0 in invalid slots); "valid" bool [B, G]; "fell_back" bool [B]}.
    """
    fill = tuple(float(c) for c in fill_rgb)
    p = {
        k: jnp.asarray(v, _I32 if k == "hue" else (bool if k in ("mirror", "nearest") else _F32))
        for k, v in params.items()
    }
    fn = lambda pp, im, hw, b, lab, v: _apply_one(pp, im, hw, b, lab, v, size, fill)  # noqa: E731
    return jax.vmap(fn)(
        p,
        jnp.asarray(images),
        jnp.asarray(image_sizes, _I32),
        jnp.asarray(boxes, _F32),
        jnp.asarray(labels, _I32),
        jnp.asarray(valid, bool),
    )


def augment_batch(
    key, images, image_sizes, boxes, labels, valid, *, size, fill_rgb, expand_prob=0.6
):
    """`sample_params` then `apply_params` (same arguments and output dict)."""
    params = sample_params(key, image_sizes, boxes, valid, expand_prob=expand_prob)
    return apply_params(
        params, images, image_sizes, boxes, labels, valid, size=size, fill_rgb=fill_rgb
    )
