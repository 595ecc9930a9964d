"""COCO metrics (host side): faster-coco-eval by default, pycocotools as the reference.
The only place COCO xywh pixels appear."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2det_jax.core import box_ops
from m2det_jax.paths import as_path

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # fmt: skip


def coco_results_array(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       valid: np.ndarray, image_ids: np.ndarray, category_ids: Sequence[int],
                       pixel_offset: int = 0) -> np.ndarray:  # fmt: skip
    """Detections [N, K, ...] (pixels, xyxy; classes 1..C-1) -> the valid rows as one
    float64 array [M, 7] (image_id, x, y, w, h, score, category_id): what both backends'
    `loadRes` read, built without a loop per row.

    `pixel_offset=1` writes w = x2 - x1 + 1 as the original's COCO export does.
    `category_ids[c - 1]` is the COCO id of contiguous class c.
    """
    cat = np.asarray(category_ids)
    valid = np.asarray(valid, bool)
    img, _ = np.nonzero(valid)
    xywh = box_ops.xyxy_to_xywh(np.asarray(boxes, np.float64)[valid], pixel_offset)
    return np.concatenate([
        np.asarray(image_ids, np.float64)[img][:, None], xywh,
        np.asarray(scores, np.float64)[valid][:, None],
        cat[np.asarray(classes)[valid].astype(np.int64) - 1][:, None].astype(np.float64),
    ], axis=1).reshape(-1, 7)  # fmt: skip


def to_coco_results(*detections, **kw) -> list[dict]:
    """`coco_results_array(*detections, **kw)` as COCO result dicts (image_id,
    category_id, bbox [x, y, w, h], score), e.g. for a results JSON file."""
    rows = coco_results_array(*detections, **kw)
    return [
        {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": r[1:5].tolist(),
         "score": float(r[5])}
        for r in rows
    ]  # fmt: skip


COCO_BACKENDS = ("faster_coco_eval", "pycocotools")


def coco_evaluate(annotation_file: str | os.PathLike | dict, results: list[dict] | np.ndarray,
                  image_ids=None, verbose: bool = False,
                  backend: str = "faster_coco_eval", category_ids=None,
                  keep: dict | None = None) -> dict[str, float]:  # fmt: skip
    """The 12 standard COCO box metrics plus `AP/<category name>` per class.

    `annotation_file`: a COCO-format instances JSON (local or a URI such as gs://), or its
    content as a dict (`m2det_jax.data.ground_truth`). `results`: COCO result dicts
    (`to_coco_results`) or their [N, 7] array (`coco_results_array`).

    `backend`: "faster_coco_eval" (C++; the same 12 numbers and per-class AP, several
    times faster: `tests/test_evaluation.py` compares them) or "pycocotools" (the reference).
    Images of `image_ids` (default: all in the annotations) with no detection count as
    misses. No detections at all gives zeros, not an error. `category_ids`: score only
    these categories (COCOeval's `params.catIds`; `m2det eval --classes`), default all.
    `keep`: a dict that receives the evaluator's accumulated arrays ("precision" [T, R, K,
    A, M], "recall" [T, K, A, M], "iou_thresholds", "recall_thresholds", "category_ids"),
    what `evaluation.pictures` draws.
    """
    if backend not in COCO_BACKENDS:
        raise ValueError(f"eval.backend={backend!r}: expected one of {COCO_BACKENDS}")
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    dataset = annotation_file
    if not isinstance(dataset, dict):
        dataset = json.loads(as_path(annotation_file).read_text())
    if isinstance(results, np.ndarray):
        empty = results.size == 0
        results = np.asarray(results, np.float64).reshape(-1, 7)
    else:
        empty = not results
        results = json.loads(json.dumps(results))  # loadRes adds fields: work on a copy
    with quiet:
        if backend == "faster_coco_eval":
            gt, evaluator = FasterCOCO(dataset), COCOeval_faster
        else:
            gt, evaluator = COCO(), COCOeval
            gt.dataset = dataset
            gt.createIndex()
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    if empty:
        metrics = dict.fromkeys(METRIC_NAMES, 0.0)
        for c in gt.loadCats(category_ids or gt.getCatIds()):
            metrics[f"AP/{c['name']}"] = 0.0
        return metrics
    with quiet:
        dt = gt.loadRes(results)
        ev = evaluator(gt, dt, "bbox")
        ev.params.imgIds = ids
        if category_ids:
            ev.params.catIds = sorted(int(c) for c in category_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {n: float(v) for n, v in zip(METRIC_NAMES, ev.stats[:12], strict=True)}
    if keep is not None:
        keep.update(precision=np.asarray(ev.eval["precision"]),
                    recall=np.asarray(ev.eval["recall"]),
                    iou_thresholds=np.asarray(ev.params.iouThrs),
                    recall_thresholds=np.asarray(ev.params.recThrs),
                    category_ids=[int(c) for c in ev.params.catIds])  # fmt: skip
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = gt.cats[int(cat_id)]["name"]
        metrics[f"AP/{name}"] = float(p[p > -1].mean()) if np.any(p > -1) else 0.0
    return metrics
