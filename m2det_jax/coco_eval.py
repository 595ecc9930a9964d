"""COCO metrics with pycocotools (host side). The only place COCO xywh pixels appear."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2det_jax import box_ops
from m2det_jax.paths import as_path

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # fmt: skip


def to_coco_results(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    image_ids: np.ndarray,
    category_ids: Sequence[int],
    pixel_offset: int = 0,
) -> list[dict]:
    """Detections [N, K, ...] (pixels, xyxy; classes 1..C-1) -> COCO result dicts.

    `pixel_offset=1` writes w = x2 - x1 + 1 as the original's COCO export does.
    `category_ids[c - 1]` is the COCO id of contiguous class c.
    """
    cat = np.asarray(category_ids)
    valid = np.asarray(valid, bool)
    img, _ = np.nonzero(valid)
    xywh = box_ops.xyxy_to_xywh(np.asarray(boxes, np.float64)[valid], pixel_offset)
    cats = cat[np.asarray(classes)[valid].astype(np.int64) - 1]
    ids = np.asarray(image_ids)[img]
    scores = np.asarray(scores)[valid].astype(np.float64)
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": sc}
        for i, c, b, sc in zip(ids.tolist(), cats.tolist(), xywh.tolist(), scores.tolist(),
                               strict=True)
    ]


def coco_evaluate(annotation_file: str | os.PathLike | dict, results: list[dict],
                  image_ids=None, verbose: bool = False) -> dict[str, float]:  # fmt: skip
    """The 12 standard COCO box metrics plus `AP/<category name>` per class.

    `annotation_file`: a COCO-format instances JSON (local or a URI such as gs://), or its
    content as a dict (`m2det_jax.data.ground_truth`).

    Images of `image_ids` (default: all in the annotations) with no detection count as
    misses. No detections at all gives zeros, not an error.
    """
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    dataset = annotation_file
    if not isinstance(dataset, dict):
        dataset = json.loads(as_path(annotation_file).read_text())
    with quiet:
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    if not results:
        metrics = dict.fromkeys(METRIC_NAMES, 0.0)
        for c in gt.loadCats(gt.getCatIds()):
            metrics[f"AP/{c['name']}"] = 0.0
        return metrics
    with quiet:
        dt = gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {n: float(v) for n, v in zip(METRIC_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = gt.cats[cat_id]["name"]
        metrics[f"AP/{name}"] = float(p[p > -1].mean()) if np.any(p > -1) else 0.0
    return metrics
