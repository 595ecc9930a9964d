"""Per-example grain transforms: record -> decoded, augmented (or resized), padded example.

Each transform returns a dict of numpy arrays: `ok` (False: undecodable, skip it),
`stats` (int64 counts in `records.STAT_KEYS` order, summed by the iterator in the main
process) and, when ok, image uint8 [S, S, 3], boxes float32 [G, 4], labels int32 [G],
valid bool [G], image_id int64, image_sizes int32 [2] (height, width of the stored image).

With `data.augment_on_device` the training example (`CanvasExample`) is only decoded and
placed at the top-left of a zero canvas [C, C, 3] (C = data.device_canvas; a larger image
is first shrunk to fit, aspect kept), with `canvas_sizes` int32 [2] the (height, width)
it covers there; `data.augment_device` does the rest inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import cv2
import grain.python as grain
import numpy as np

from m2det_jax.core.preprocess import resize
from m2det_jax.data import augment_host, records
from m2det_jax.data.worker_guard import ExitWithParent


@dataclasses.dataclass(frozen=True)
class ExampleParams:
    """What the per-example transforms need from the config (picklable for workers)."""

    size: int
    max_boxes: int
    include_crowd: bool
    keep_difficult: bool
    expand_prob: float
    fill_rgb: tuple[int, int, int]
    canvas: int = 0  # > 0: pad to this canvas for on-device augmentation

    @classmethod
    def from_config(cls, cfg) -> ExampleParams:
        pp = cfg.preprocess
        return cls(
            size=int(cfg.model.input_size),
            max_boxes=int(cfg.data.max_boxes),
            include_crowd=bool(cfg.data.include_crowd),
            keep_difficult=bool(cfg.data.keep_difficult),
            expand_prob=float(cfg.data.expand_prob),
            fill_rgb=augment_host.fill_rgb_from(pp.channel_order, pp.pixel_means),
            canvas=int(cfg.data.device_canvas) if cfg.data.augment_on_device else 0,
        )



def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int, stats: dict) -> dict:
    """boxes/labels zero padded (or truncated, counted) to `max_boxes`, with `valid`."""
    n = len(boxes)
    if n > max_boxes:
        stats["truncated_boxes"] += n - max_boxes
        n = max_boxes
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_l = np.zeros((max_boxes,), np.int32)
    out_b[:n] = boxes[:n]
    out_l[:n] = labels[:n]
    if n == 0:
        stats["empty_images"] += 1
    return {"boxes": out_b, "labels": out_l, "valid": np.arange(max_boxes) < n}


def stats_array(stats: dict) -> np.ndarray:
    """Per-example counts as int64 [len(STAT_KEYS)] (cheap to send from a worker)."""
    return np.array([stats[k] for k in records.STAT_KEYS], np.int64)


def _example(ex: dict, image: np.ndarray, boxes, labels, p: ExampleParams, stats) -> dict:
    out = {
        "ok": np.bool_(True),
        "image": image,
        "image_id": ex["image_id"],
        "image_sizes": ex["image_sizes"],
    }
    out.update(pad_boxes(boxes, labels, p.max_boxes, stats))
    out["stats"] = stats_array(stats)
    return out


def _skipped(stats: dict) -> dict:
    return {"ok": np.bool_(False), "stats": stats_array(stats)}


class TrainExample(ExitWithParent, grain.RandomMapTransform):
    """Record -> augmented uint8 example (or a skip marker), with its counts."""

    def __init__(self, p: ExampleParams):
        self.p = p
        self.image_shape = (p.size, p.size, 3)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        ex, stats = records.decode_record(record, self.p.include_crowd, self.p.keep_difficult)
        if ex is None:
            return _skipped(stats)
        img, boxes, labels, fell_back = augment_host.train_augment(
            ex["image"],
            ex["boxes"],
            ex["labels"],
            rng,
            size=self.p.size,
            fill_rgb=self.p.fill_rgb,
            expand_prob=self.p.expand_prob,
        )
        stats["augment_fallbacks"] += int(fell_back)
        return _example(ex, img, boxes, labels, self.p, stats)


class EvalExample(ExitWithParent, grain.MapTransform):
    """Record -> resized uint8 example (cv2 INTER_LINEAR, as the original), boxes unchanged."""

    def __init__(self, p: ExampleParams):
        self.p = p
        self.image_shape = (p.size, p.size, 3)

    def map(self, record: dict) -> dict:
        ex, stats = records.decode_record(record, self.p.include_crowd, self.p.keep_difficult)
        if ex is None:
            return _skipped(stats)
        image = resize(ex["image"], self.p.size)
        return _example(ex, image, ex["boxes"], ex["labels"], self.p, stats)


def place_on_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [canvas, canvas, 3] with `image` at the top-left and zeros elsewhere,
    int32 (height, width) it covers). A larger image is shrunk to fit (INTER_AREA)."""
    h, w = image.shape[:2]
    if max(h, w) > canvas:
        f = canvas / max(h, w)
        h, w = max(1, min(canvas, round(h * f))), max(1, min(canvas, round(w * f)))
        image = resize(image, (h, w), cv2.INTER_AREA)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out[:h, :w] = image
    return out, np.array([h, w], np.int32)


class CanvasExample(ExitWithParent, grain.MapTransform):
    """Record -> decoded uint8 image on a fixed canvas, boxes unchanged (normalized to
    the image), for augmentation on the device."""

    def __init__(self, p: ExampleParams):
        self.p = p
        self.image_shape = (p.canvas, p.canvas, 3)

    def map(self, record: dict) -> dict:
        ex, stats = records.decode_record(record, self.p.include_crowd, self.p.keep_difficult)
        if ex is None:
            return _skipped(stats)
        image, covered = place_on_canvas(ex["image"], self.p.canvas)
        out = _example(ex, image, ex["boxes"], ex["labels"], self.p, stats)
        out["canvas_sizes"] = covered
        return out
