"""Detection on arbitrary image files: loading, preprocessing, test-time augmentation, drawing.

The single-pass path is `evaluate.make_inference_fn` (network + `postprocess.detect` in one
jit); this module adds what a user-facing `m2det detect` needs around it:

* `list_images` / `load_image`: a file, a folder or a glob; unreadable files are reported,
  never fatal.
* `preprocess`: uint8 RGB of any size -> the network input of the config (cv2-style bilinear
  resize to a square `input_size`, channel order, means, scale: the eval pipeline's steps).
* `detect_tta`: multi-scale + horizontal-flip test-time augmentation (the paper's 44.2 AP
  setting, Table 1 "multi-scale"). Every pass is decoded to normalized boxes and class
  probabilities, flipped passes are mirrored back (x1' = 1 - x2), the candidates of all
  passes are concatenated and suppressed once more with the configured NMS
  (`detect_decoded`).
* `draw_detections` / `detections_to_records`: labelled boxes on the original image and the
  JSON rows of `detections.json`.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2det_jax.data.augment import normalize, resize_bilinear
from m2det_jax.data.sources import decode_image
from m2det_jax.models import build_model
from m2det_jax.postprocess import decode_and_score, make_detect_fn
from m2det_jax.priors import prior_boxes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# ------------------------------------------------------------------------------ images


def list_images(path: str) -> list[str]:
    """Image files named by `path`: one file, a folder (its image files) or a glob pattern.

    A folder contributes every regular file with an image extension (IMAGE_EXTENSIONS,
    case-insensitive), sorted; an explicitly named file or a glob match is taken whatever
    its extension. Raises FileNotFoundError when nothing matches.
    """
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [
            os.path.join(path, n)
            for n in names
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
        ]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no images at {path!r}")
    return files


def load_image(path: str) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] of an image file (EXIF orientation not applied); None if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return decode_image(data)


def preprocess(
    images: Sequence[np.ndarray], cfg: ml_collections.ConfigDict, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images of any sizes -> (network input float32 [B, S, S, 3], hw float32 [B, 2]).

    The eval pipeline's steps: cv2-style bilinear resize to S x S (aspect not kept), then
    channel order, means and scale of `cfg.preprocess`. S is `size` or cfg.model.input_size.
    """
    s = int(size or cfg.model.input_size)
    p = cfg.preprocess
    x = np.stack(
        [
            normalize(resize_bilinear(im, s), p.channel_order, p.pixel_means, p.pixel_scale)
            for im in images
        ]
    )
    hw = np.array([im.shape[:2] for im in images], np.float32)
    return x, hw


def pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """Pads axis 0 of `x` with zeros to `batch` rows (a fixed shape: one compilation)."""
    if x.shape[0] == batch:
        return x
    pad = np.zeros((batch - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


# ------------------------------------------------------------------ decoded-box NMS


def _center_form(boxes: jnp.ndarray) -> jnp.ndarray:
    """xyxy -> (cx, cy, w, h).  # [..., 4]"""
    return jnp.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]],
                           axis=-1)  # fmt: skip


def make_decoded_detect_fn(cfg: ml_collections.ConfigDict) -> Callable[..., dict]:
    """fn(boxes [B, P, 4], scores [B, P, C], image_sizes [B, 2] | None) -> detect's dict.

    Per-class NMS of boxes that are already decoded (normalized xyxy) with class
    probabilities (softmax rows, class 0 = background), e.g. the merged candidates of several
    TTA passes. Built on the public `postprocess.detect`: each box becomes its own prior
    (centre form) with a zero regression, which decodes back to the box (to float32
    rounding, ~1e-7 normalized), and log-probabilities are its logits, whose softmax gives
    the probabilities back (to float32 rounding). Thresholds, NMS method, caps and the
    fixed output layout are therefore exactly `detect`'s for `cfg`.

    Images run one at a time (priors are shared by a batch in `detect`); one compilation per
    candidate count.
    """
    detect_fn = make_detect_fn(cfg)
    tiny = float(np.finfo(np.float32).tiny)

    @jax.jit
    def one(boxes, scores, hw):  # [P, 4], [P, C], [1, 2] | None
        loc = jnp.zeros((1,) + boxes.shape, jnp.float32)
        logits = jnp.log(jnp.maximum(scores.astype(jnp.float32), tiny))[None]
        return detect_fn(loc, logits, _center_form(boxes.astype(jnp.float32)), hw)

    def fn(boxes, scores, image_sizes=None):
        outs = [
            one(boxes[i], scores[i], None if image_sizes is None else image_sizes[i : i + 1])
            for i in range(boxes.shape[0])
        ]
        return {k: jnp.concatenate([o[k] for o in outs]) for k in outs[0]}

    return fn


# ------------------------------------------------------------------------------- TTA


def config_for_size(cfg: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """A copy of `cfg` with model.input_size = size (priors follow: `prior_boxes(copy)`)."""
    out = cfg.copy_and_resolve_references()
    out.model.input_size = int(size)
    return out


def make_pass_fn(cfg_s: ml_collections.ConfigDict, flip: bool) -> Callable[..., list]:
    """jit((variables, x [B, S, S, 3] preprocessed) -> [(boxes [B,P,4], scores [B,P,C]), ...]).

    One entry for the plain pass and, with `flip`, a second one for the horizontally flipped
    input, its boxes mirrored back to the unflipped image (x1' = 1 - x2, x2' = 1 - x1, in
    normalized coordinates; W - x2 in pixels). Both passes run as one forward of 2B images.
    """
    model = build_model(cfg_s)
    priors = jnp.asarray(prior_boxes(cfg_s))

    def fn(variables, x):
        b = x.shape[0]
        if flip:
            x = jnp.concatenate([x, x[:, :, ::-1]])
        out = model.apply(variables, x, train=False)
        boxes, scores = decode_and_score(out["loc"], out["logits"], priors, cfg_s)
        passes = [(boxes[:b], scores[:b])]
        if flip:
            fb = boxes[b:]
            mirrored = jnp.stack([1.0 - fb[..., 2], fb[..., 1], 1.0 - fb[..., 0], fb[..., 3]], -1)
            passes.append((mirrored, scores[b:]))
        return passes

    return jax.jit(fn)


def tta_passes(
    variables, images: Sequence[np.ndarray], cfg, sizes: Sequence[int], flip: bool = True
) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
    """Decoded candidates of every TTA pass: [(boxes [B,P_s,4] normalized, scores [B,P_s,C])].

    Order: for each size, the plain pass then (with `flip`) the flipped one.
    """
    out = []
    for s in sizes:
        x, _ = preprocess(images, cfg, s)
        out += cached_pass_fn(cfg, int(s), bool(flip))(variables, x)
    return out


def _cfg_key(cfg) -> str:
    return cfg.to_json_best_effort(sort_keys=True)


_PASS_FNS: dict[tuple[str, int, bool], Callable] = {}


def cached_pass_fn(cfg, size: int, flip: bool):
    key = (_cfg_key(cfg), size, flip)
    if key not in _PASS_FNS:
        _PASS_FNS[key] = make_pass_fn(config_for_size(cfg, size), flip)
    return _PASS_FNS[key]


_DECODED_FNS: dict[str, Callable] = {}


def cached_decoded_fn(cfg):
    key = _cfg_key(cfg)
    if key not in _DECODED_FNS:
        _DECODED_FNS[key] = make_decoded_detect_fn(cfg)
    return _DECODED_FNS[key]


def detect_tta(
    variables,
    images: Sequence[np.ndarray],
    cfg: ml_collections.ConfigDict,
    sizes: Sequence[int] | None = None,
    flip: bool = True,
) -> dict[str, jnp.ndarray]:
    """Multi-scale + flip test-time augmentation on uint8 RGB images of any sizes.

    Args:
      variables: {"params", "batch_stats"} of the model (input size is not part of them).
      images: B uint8 RGB [H, W, 3] arrays (a list, or a [B, H, W, 3] array).
      cfg: config; postprocess settings and anchors are used for every size.
      sizes: input sizes to run (default: cfg.model.input_size only). Each size gets its own
        priors (`prior_boxes` of the config with that input_size).
      flip: also run horizontally flipped copies.

    Returns:
      `detect`'s dict for the B images with boxes in their pixels; same K as a plain
      `detect` for `cfg` whatever the number of passes.
    """
    sizes = tuple(sizes or (cfg.model.input_size,))
    passes = tta_passes(variables, images, cfg, sizes, flip)
    boxes = jnp.concatenate([p[0] for p in passes], axis=1)  # [B, sum P_s, 4]
    scores = jnp.concatenate([p[1] for p in passes], axis=1)  # [B, sum P_s, C]
    hw = jnp.asarray(np.array([im.shape[:2] for im in images], np.float32))
    return cached_decoded_fn(cfg)(boxes, scores, hw)


# ------------------------------------------------------------------- detection runner


def make_detector(
    cfg, variables, *, batch_size: int = 1, tta_sizes: Sequence[int] | None = None,
    tta_flip: bool = False,
) -> Callable[[Sequence[np.ndarray]], dict[str, np.ndarray]]:  # fmt: skip
    """images (uint8 RGB, any sizes, at most batch_size) -> numpy detections in their pixels.

    Without TTA: one jitted network + detect (`evaluate.make_inference_fn`) at a fixed batch
    (the last batch is zero-padded, so it compiles once). With `tta_sizes` or `tta_flip`:
    `detect_tta`.
    """
    if tta_sizes or tta_flip:
        sizes = tuple(tta_sizes or (cfg.model.input_size,))
        return lambda ims: jax.device_get(detect_tta(variables, ims, cfg, sizes, tta_flip))
    from m2det_jax.evaluate import make_inference_fn

    infer = make_inference_fn(cfg)

    def run(ims):
        n = len(ims)
        x, hw = preprocess(ims, cfg)
        hw_padded = pad_batch(hw, batch_size)
        hw_padded[n:] = 1.0
        dets = jax.device_get(infer(variables, pad_batch(x, batch_size), hw_padded))
        return {k: np.asarray(v)[:n] for k, v in dets.items()}

    return run


def class_name(k: int, class_names: Sequence[str] | None) -> str:
    """Name of model class k (1-based; 0 = background): class_names[k-1] or 'class k'."""
    if class_names and 1 <= k <= len(class_names):
        return class_names[k - 1]
    return f"class {k}"


def detections_to_records(
    dets: dict[str, np.ndarray], i: int, width: int, height: int, score_threshold: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Valid rows of image i with score >= score_threshold, highest score first.

    Boxes are in pixels, clipped to the image ([0, W] x [0, H]); "class" is the model class
    (1..C-1), "label" its name.
    """
    valid = np.asarray(dets["valid"][i], bool)
    scores = np.asarray(dets["scores"][i], np.float32)
    keep = np.nonzero(valid & (scores >= score_threshold))[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes = np.asarray(dets["boxes"][i], np.float32)[keep]
    boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
    classes = np.asarray(dets["classes"][i])[keep]
    return [
        {
            "box": [round(float(v), 2) for v in b],
            "score": round(float(s), 5),
            "class": int(c),
            "label": class_name(int(c), class_names),
        }
        for b, s, c in zip(boxes, scores[keep], classes, strict=True)
    ]


def _colour(k: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, records: Sequence[dict[str, Any]]) -> Image.Image:
    """The RGB image with each record's box and 'label score' caption drawn on it."""
    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(max(im.size) / 300))
    for r in records:
        x1, y1, x2, y2 = r["box"]
        colour = _colour(r["class"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{r['label']} {r['score']:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0] + 4, tb[3] - tb[1] + 4
        ty = y1 - th if y1 - th >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
        draw.text((x1 + 2, ty + 2 - tb[1]), text, fill=(0, 0, 0), font=font)
    return im


def _output_name(path: str, used: set[str]) -> str:
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"
    name, k = stem + ext, 1
    while name in used:
        name, k = f"{stem}_{k}{ext}", k + 1
    used.add(name)
    return name


def detect_files(
    cfg, variables, inputs: str, output_dir: str, *, score_threshold: float = 0.3,
    class_names: Sequence[str] | None = None, batch_size: int = 1,
    tta_sizes: Sequence[int] | None = None, tta_flip: bool = False, log=print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Detects objects in the images of `inputs` (file, folder or glob).

    Writes one image per readable input with labelled boxes (detections with score >=
    score_threshold) to `output_dir`, and `output_dir/detections.json`: a list with one
    entry per processed image {file, output, width, height, detections: [{box [x1, y1, x2,
    y2] pixels, score, class, label}]}. Unreadable files are skipped with a warning on
    stderr naming them. Returns the JSON list.
    """
    import json

    files = list_images(inputs)
    os.makedirs(output_dir, exist_ok=True)
    run = make_detector(cfg, variables, batch_size=batch_size, tta_sizes=tta_sizes,
                        tta_flip=tta_flip)  # fmt: skip
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        if not pending:
            return
        dets = run([im for _, im in pending])
        for i, (path, im) in enumerate(pending):
            h, w = im.shape[:2]
            recs = detections_to_records(dets, i, w, h, score_threshold, class_names)
            name = _output_name(path, used)
            draw_detections(im, recs).save(os.path.join(output_dir, name))
            results.append({"file": os.path.abspath(path), "output": name, "width": int(w),
                            "height": int(h), "detections": recs})  # fmt: skip
            log(f"{path}: {len(recs)} detections -> {name}")
        pending.clear()

    for path in files:
        im = load_image(path)
        if im is None:
            print(f"warning: skipping unreadable image {path}", file=sys.stderr)
            continue
        pending.append((path, im))
        if len(pending) == batch_size:
            flush()
    flush()
    with open(os.path.join(output_dir, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results
