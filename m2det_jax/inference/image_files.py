"""Detection on image files for `m2det detect`: listing, loading, drawing, detections.json.

* `list_images` / `load_image`: a file, a folder or a glob; unreadable files are reported,
  never fatal.
* `detect_files`: every readable image through an `m2det_jax.Detector` (plain, or the
  configured test-time augmentation), one drawn image per input and `detections.json`.
* `draw_detections` / `detections_to_records`: labelled boxes on the original image and the
  JSON rows of `detections.json`.
"""

from __future__ import annotations

import colorsys
import glob
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2det_jax import data
from m2det_jax.paths import as_path

_log = logging.getLogger(__name__)

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


# EXIF Orientation tag value -> the PIL transposes that turn the stored pixels upright.
_EXIF_TRANSPOSES = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}  # fmt: skip


def exif_orientation(raw: bytes) -> int:
    """The EXIF Orientation (1..8) of encoded image bytes; 1 (upright) when absent."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable metadata: as stored
        return 1


def load_image(path: str, exif: bool = False) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] of an image file; None if unreadable. The stored pixel grid
    (as training data and the original are read) unless `exif`: then turned as the EXIF
    Orientation tag says (phone photos), so boxes refer to the upright image."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    image = data.decode_image(raw)
    if image is None or not exif:
        return image
    steps = _EXIF_TRANSPOSES.get(exif_orientation(raw), ())
    if not steps:
        return image
    pil = Image.fromarray(image)
    for t in steps:
        pil = pil.transpose(t)
    return np.asarray(pil)


def class_name(k: int, class_names: Sequence[str] | None) -> str:
    """Name of model class k (1-based; 0 = background): class_names[k-1] or 'class k'."""
    if class_names and 1 <= k <= len(class_names):
        return class_names[k - 1]
    return f"class {k}"


def class_ids(spec: str | Sequence[int | str] | None,
              class_names: Sequence[str] | None) -> set[int] | None:
    """Model class ids (1..C-1) of a class filter: ids, names (of `class_names`) or a
    comma-separated string of either ("person,car", "1,3"); None = every class. An unknown
    name is a ValueError naming it and the known ones."""
    if spec is None or spec == "" or spec == ():
        return None
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = set()
    for x in items:
        if isinstance(x, int) or (isinstance(x, str) and x.isdigit()):
            out.add(int(x))
        elif class_names and x in class_names:
            out.add(list(class_names).index(x) + 1)
        else:
            known = ", ".join(class_names) if class_names else "none stored: use ids"
            raise ValueError(f"class filter: unknown class {x!r} (names: {known})")
    return out


def detections_to_records(
    dets: dict[str, np.ndarray], i: int, width: int, height: int, score_threshold: float = 0.0,
    class_names: Sequence[str] | None = None, classes: set[int] | None = None,
    max_det: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Valid rows of image i with score >= score_threshold, highest score first; only the
    model classes in `classes` (None: all) and at most `max_det` rows (0: all). The soft-NMS
    runs per class, so dropping other classes afterwards equals not detecting them.

    Boxes are in pixels, clipped to the image ([0, W] x [0, H]); "class" is the model class
    (1..C-1), "label" its name.
    """
    valid = np.asarray(dets["valid"][i], bool)
    scores = np.asarray(dets["scores"][i], np.float32)
    keep_mask = valid & (scores >= score_threshold)
    if classes is not None:
        keep_mask &= np.isin(np.asarray(dets["classes"][i]), sorted(classes))
    keep = np.nonzero(keep_mask)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if max_det > 0:
        keep = keep[:max_det]
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
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, records: Sequence[dict[str, Any]]) -> Image.Image:
    """The RGB image with each record's box and 'label score' caption drawn on it (the
    label alone where the score is None, e.g. ground truth). Boxes are drawn clipped to
    the image (NMS output is not clipped; an untrained network's can be huge); boxes with a
    non-finite corner or nothing inside the image are left out."""
    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(max(im.size) / 300))
    w, h = im.size
    for r in records:
        box = np.asarray(r["box"], np.float64)
        if not np.isfinite(box).all():
            continue
        x1, y1, x2, y2 = (float(v) for v in np.clip(box, -1.0, [w, h, w, h]))
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            continue
        colour = _colour(r["class"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = r["label"] if r.get("score") is None else f"{r['label']} {r['score']:.2f}"
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


def _pil_format(name: str) -> str:
    return "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"


def detect_files(detector, inputs: str, output_dir: str, *, log=print) -> list[dict[str, Any]]:
    """Detects objects in the images of `inputs` (file, folder or glob) with `detector`
    (an `m2det_jax.Detector`: its batch size, score threshold, class filter, max_det,
    EXIF handling and class names).

    Writes one image per readable input with labelled boxes to `output_dir`, and
    `output_dir/detections.json`: a list with one entry per processed image {file, output,
    width, height, detections: [{box [x1, y1, x2, y2] pixels, score, class, label}]}.
    Unreadable files are skipped with a warning on stderr naming them. Returns the list.
    """
    files = list_images(inputs)
    out = as_path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        if not pending:
            return
        for (path, im), r in zip(pending, detector([im for _, im in pending]), strict=True):
            h, w = im.shape[:2]
            recs = r.to_json()
            name = _output_name(path, used)
            with (out / name).open("wb") as f:
                r.draw().save(f, format=_pil_format(name))
            results.append({"file": os.path.abspath(path), "output": name, "width": int(w),
                            "height": int(h), "detections": recs})  # fmt: skip
            log(f"{path}: {len(recs)} detections -> {name}")
        pending.clear()

    for path in files:
        im = load_image(path, detector.exif)
        if im is None:
            _log.warning("skipping unreadable image %s", path)
            continue
        pending.append((path, im))
        if len(pending) == detector.batch_size:
            flush()
    flush()
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    return results
