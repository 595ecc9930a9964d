"""Record decoding: one stored TFDS record -> one example, with OpenCV and numpy only.

Nothing here imports TFDS (or TensorFlow): a record is a plain dict of numpy values and
encoded image bytes, as `schema.data_source` returns it, and `decode_image` is what
inference uses on image files too.

One box format leaves this module: normalized `[x1, y1, x2, y2]` (TFDS's
`[ymin, xmin, ymax, xmax]` is converted here, once). Labels leave as 1..C-1 (0 is the
background); `coco_json.category_ids(builder)[label - 1]` is the COCO category id.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from m2det_jax.core import box_ops

# Per-example counters (summed into `iterator.DataStats`). See `decode_record`.
STAT_KEYS = (
    "examples",  # records read
    "bad_images",  # undecodable image: example skipped
    "bad_boxes",  # non-finite or degenerate (zero/negative size after clipping): dropped
    "clipped_boxes",  # boxes partly outside [0, 1]: clipped
    "crowd_boxes",  # is_crowd boxes dropped (cfg.data.include_crowd False)
    "difficult_boxes",  # VOC is_difficult boxes dropped (cfg.data.keep_difficult False)
    "empty_images",  # images left with no box (kept; train: only resized)
    "truncated_boxes",  # boxes beyond cfg.data.max_boxes: dropped
    "augment_fallbacks",  # augmentation left no box >= min size: un-augmented image used
)


def new_stats() -> dict[str, int]:
    """All `STAT_KEYS` at zero."""
    return dict.fromkeys(STAT_KEYS, 0)


def _bytes(image: Any) -> bytes:
    """Encoded image bytes from a record value (bytes, or a 0-d numpy object array)."""
    return bytes(image.item() if isinstance(image, np.ndarray) else image)


# OpenCV's decoder (libjpeg-turbo, the original's cv2.imread), straight to RGB; EXIF
# orientation is not applied (box annotations refer to the stored pixel grid).
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_JPEG = b"\xff\xd8"


def _decode_jpeg(raw: bytes) -> np.ndarray | None:
    """RGB pixels of a JPEG by simplejpeg (libjpeg-turbo with its SIMD paths, ~25 % faster
    than OpenCV's build here: benchmarks/input_pipeline.py, "decode" rows) - the same
    pixels as `cv2.imdecode` (the same accurate integer IDCT and chroma upsampling; tests
    compare them on 4:2:0, 4:4:4, progressive and grayscale files). None where it declines
    (not a JPEG, CMYK, any decoder warning such as a truncated file): OpenCV decides."""
    if not raw.startswith(_JPEG):
        return None
    try:
        return simplejpeg.decode_jpeg(raw, colorspace="RGB")
    except (ValueError, RuntimeError, OSError):
        return None


def decode_image(image: Any) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] from encoded bytes (or an array); None if undecodable.

    Grayscale is repeated to 3 channels, alpha dropped, CMYK converted; the few formats
    OpenCV does not read go through PIL.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    raw = _bytes(image)
    arr = _decode_jpeg(raw)
    if arr is None and raw:
        arr = cv2.imdecode(np.frombuffer(raw, np.uint8), _CV2_FLAGS)
    if arr is None:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception:  # noqa: BLE001 - any decoder failure means "corrupt image"
            return None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        return None
    return arr


def image_hw(image: Any) -> tuple[int, int] | None:
    """(height, width) of encoded image bytes from the header only; None if unreadable."""
    try:
        with Image.open(io.BytesIO(_bytes(image))) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - corrupt images have no size
        return None
    return h, w


def clean_boxes(
    yxyx: np.ndarray, labels: np.ndarray, stats: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """TFDS [ymin,xmin,ymax,xmax] -> clipped normalized [x1,y1,x2,y2]; drops bad ones.

    Non-finite boxes, and boxes of zero or negative size after clipping to [0, 1], are
    dropped (`bad_boxes`); boxes reaching outside [0, 1] are clipped (`clipped_boxes`).
    """
    b = box_ops.yxyx_to_xyxy(np.asarray(yxyx, np.float32).reshape(-1, 4))  # [N, 4]
    labels = np.asarray(labels).reshape(-1)
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    clipped = np.clip(b, 0.0, 1.0)
    stats["clipped_boxes"] += int((finite & (clipped != b).any(axis=1)).sum())
    wh = box_ops.xyxy_to_xywh(clipped)[:, 2:]
    ok = finite & (wh > 0).all(axis=1)
    stats["bad_boxes"] += int((~ok).sum())
    return clipped[ok], labels[ok]


def image_id_from_name(name: str | bytes) -> int:
    """A stable integer id for an image file name without one (TFDS voc/20xx records,
    VOC-format folders): its digits when the stem is digits and underscores (VOC's
    "000005.jpg" -> 5, "2008_000008.jpg" -> 2008000008), else 48 bits of its SHA-1."""
    name = name.decode() if isinstance(name, bytes) else str(name)
    stem = name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    digits = stem.replace("_", "")
    if digits.isdigit() and len(digits) <= 18:
        return int(digits)
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)


def image_id(record: dict) -> int:
    """The record's `image/id`, or `image_id_from_name` of its `image/filename`."""
    if "image/id" in record:
        return int(np.asarray(record["image/id"]).item())
    name = record.get("image/filename")
    if name is None:
        return -1
    return image_id_from_name(np.asarray(name).item() if isinstance(name, np.ndarray) else name)


def decode_record(
    record: dict, include_crowd: bool = False, keep_difficult: bool = False
) -> tuple[dict | None, dict]:
    """One TFDS record -> (example or None if unusable, per-example stats).

    The example: image uint8 RGB [H, W, 3], boxes float32 [N, 4] normalized xyxy,
    labels int32 [N] in 1..C-1, image_id int64, image_sizes int32 [2] (height, width of
    the stored image). COCO `is_crowd` boxes are dropped unless `include_crowd`, VOC
    `is_difficult` ones unless `keep_difficult` (the original trains without them).
    """
    stats = new_stats()
    stats["examples"] = 1
    image = decode_image(record["image"])
    if image is None:
        stats["bad_images"] = 1
        return None, stats
    objects = record.get("objects", {})
    bbox = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    label = np.asarray(objects.get("label", np.zeros((0,))), np.int64).reshape(-1)
    n = min(len(bbox), len(label))
    bbox, label = bbox[:n], label[:n]

    def flag(key: str) -> np.ndarray:  # a per-object bool field, False where absent
        out = np.zeros(n, bool)
        if key in objects:
            v = np.asarray(objects[key]).reshape(-1)[:n].astype(bool)
            out[: len(v)] = v
        return out

    crowd = flag("is_crowd") & (not include_crowd)
    hard = flag("is_difficult") & (not keep_difficult) & ~crowd  # counted once
    stats["crowd_boxes"] += int(crowd.sum())
    stats["difficult_boxes"] += int(hard.sum())
    keep = ~(crowd | hard)
    bbox, label = bbox[keep], label[keep]
    boxes, label = clean_boxes(bbox, label, stats)
    example = {
        "image": image,
        "boxes": boxes,
        "labels": (label + 1).astype(np.int32),
        "image_id": np.int64(image_id(record)),
        "image_sizes": np.array(image.shape[:2], np.int32),
    }
    return example, stats
