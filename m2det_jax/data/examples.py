"""Per-example grain transforms: record -> decoded, augmented (or resized), padded example.

Each transform returns a dict of numpy arrays: `ok` (False: undecodable, skip it),
`stats` (int64 counts in `records.STAT_KEYS` order, summed by the iterator in the main
process) and, when ok, image uint8 [S, S, 3], boxes float32 [G, 4], labels int32 [G],
valid bool [G], image_id int64, image_sizes int32 [2] (height, width of the stored image).
"""

from __future__ import annotations

import dataclasses

import grain.python as grain
import numpy as np

from m2det_jax.data import augment, records


@dataclasses.dataclass(frozen=True)
class ExampleParams:
    """What the per-example transforms need from the config (picklable for workers)."""

    size: int
    max_boxes: int
    include_crowd: bool
    expand_prob: float
    fill_rgb: tuple[int, int, int]

    @classmethod
    def from_config(cls, cfg) -> ExampleParams:
        pp = cfg.preprocess
        return cls(
            size=int(cfg.model.input_size),
            max_boxes=int(cfg.data.max_boxes),
            include_crowd=bool(cfg.data.include_crowd),
            expand_prob=float(cfg.data.expand_prob),
            fill_rgb=augment.fill_rgb_from(pp.channel_order, pp.pixel_means),
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


class TrainExample(grain.RandomMapTransform):
    """Record -> augmented uint8 example (or a skip marker), with its counts."""

    def __init__(self, p: ExampleParams):
        self.p = p

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        ex, stats = records.decode_record(record, self.p.include_crowd)
        if ex is None:
            return _skipped(stats)
        img, boxes, labels, fell_back = augment.train_augment(
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


class EvalExample(grain.MapTransform):
    """Record -> resized (cv2-style bilinear) uint8 example, boxes unchanged."""

    def __init__(self, p: ExampleParams):
        self.p = p

    def map(self, record: dict) -> dict:
        ex, stats = records.decode_record(record, self.p.include_crowd)
        if ex is None:
            return _skipped(stats)
        image = augment.resize_bilinear(ex["image"], self.p.size)
        return _example(ex, image, ex["boxes"], ex["labels"], self.p, stats)
