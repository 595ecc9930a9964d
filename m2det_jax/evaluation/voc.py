"""The PASCAL VOC detection metric, computed as the original M2Det's `evaluation/voc.py`.

    m = voc_evaluate(ground_truth, detections, class_names, use_07_metric=True)
    m["mAP"], m["AP/dog"]

Per class, over all images: detections sorted by descending score (a stable sort: ties
keep their input order); each goes to the ground-truth box of its image and class with
the highest IoU (the +1-pixel convention: a box [x1, y1, x2, y2] spans x2 - x1 + 1
pixels), whether that box is already matched or not. Then, with IoU > `iou_threshold`:
a difficult box -> the detection is ignored (neither true nor false positive); an
unmatched box -> true positive, the box is matched; an already matched box -> false
positive (even if another box overlaps more than the threshold). Otherwise: false
positive. Recall counts the non-difficult boxes. AP is the VOC2007 11-point interpolated
AP (`use_07_metric=True`: the mean over recall 0, 0.1, ..., 1 of the best precision at
that recall or above, what the original reports for 2007 test) or the area under the
monotone precision envelope (`use_07_metric=False`, VOC2010 and later).

One difference from the original: a class with no non-difficult box anywhere has no AP
there (its recall divides by zero, NaN); here it is reported as -1 and left out of the
mAP, as COCO does for empty categories.

Vectorised in numpy: since a detection's target box does not depend on earlier matches,
the sequential loop of the original reduces to "the first detection (in score order) of
each target box is the true positive".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from m2det_jax.core import box_ops
from m2det_jax.data import records, schema
from m2det_jax.paths import as_path

# (data_dir, builder name, split) -> ground truth: read once per process.
_CACHE: dict[tuple[str, str, str], dict] = {}


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from the cumulative recall / precision of score-sorted detections."""
    rec, prec = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):  # 0, 0.1, ..., 1.0
            above = prec[rec >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_plus1(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU [M, G] of boxes [M, 4] against gt [M, G, 4] (per-detection candidates)."""
    b = boxes[:, None, :]
    iw = np.maximum(np.minimum(b[..., 2], gt[..., 2]) - np.maximum(b[..., 0], gt[..., 0]) + 1, 0)
    ih = np.maximum(np.minimum(b[..., 3], gt[..., 3]) - np.maximum(b[..., 1], gt[..., 1]) + 1, 0)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    area_g = (gt[..., 2] - gt[..., 0] + 1) * (gt[..., 3] - gt[..., 1] + 1)
    return inter / (area_b + area_g - inter)


def _as_arrays(entry: Mapping[str, Any], keys: Sequence[str], where: str) -> dict:
    out = {}
    for k in keys:
        if k not in entry:
            raise ValueError(f"{where}: missing {k!r}")
        out[k] = np.asarray(entry[k])
    out["boxes"] = out["boxes"].astype(np.float64).reshape(-1, 4)
    n = len(out["boxes"])
    for k in keys:
        if k != "boxes":
            out[k] = out[k].reshape(-1)
            if len(out[k]) != n:
                raise ValueError(f"{where}: {len(out[k])} {k} for {n} boxes")
    return out


def class_ap(
    ground_truth: Mapping, detections: Mapping, label: int, *,
    use_07_metric: bool = True, iou_threshold: float = 0.5,
) -> tuple[float, int]:  # fmt: skip
    """(AP, number of non-difficult boxes) of one class; AP -1 when that number is 0.
    Arguments as `voc_evaluate`'s, already validated."""
    images = list(ground_truth)
    index = {image_id: i for i, image_id in enumerate(images)}
    gts = []
    for image_id in images:
        g = ground_truth[image_id]
        m = g["labels"] == label
        gts.append((g["boxes"][m], g["difficult"][m]))
    npos = int(sum(int((~d).sum()) for _, d in gts))
    g_max = max([len(b) for b, _ in gts] + [1])
    gt_boxes = np.zeros((len(images), g_max, 4))
    gt_valid = np.zeros((len(images), g_max), bool)
    gt_difficult = np.zeros((len(images), g_max), bool)
    for i, (b, d) in enumerate(gts):
        gt_boxes[i, : len(b)], gt_valid[i, : len(b)], gt_difficult[i, : len(b)] = b, True, d

    boxes, scores, owners = [], [], []
    for image_id, det in detections.items():
        m = det["labels"] == label
        boxes.append(det["boxes"][m])
        scores.append(det["scores"][m].astype(np.float64))
        owners.append(np.full(int(m.sum()), index[image_id]))
    if npos == 0:
        return -1.0, 0
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    scores = np.concatenate(scores) if scores else np.zeros((0,))
    owners = np.concatenate(owners).astype(np.int64) if owners else np.zeros((0,), np.int64)
    if len(scores) == 0:
        return 0.0, npos
    order = np.argsort(-scores, kind="stable")
    boxes, owners = boxes[order], owners[order]

    iou = np.where(gt_valid[owners], _iou_plus1(boxes, gt_boxes[owners]), -np.inf)
    best = iou.argmax(axis=1)
    overlaps = iou[np.arange(len(best)), best] > iou_threshold
    difficult = gt_difficult[owners, best]
    target = owners * g_max + best  # a global id of the best box
    candidate = overlaps & ~difficult
    tp = np.zeros(len(best), bool)
    idx = np.flatnonzero(candidate)
    _, first = np.unique(target[idx], return_index=True)  # earliest in score order
    tp[idx[first]] = True
    fp = ~tp & ~(overlaps & difficult)
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    recall = tp_c / npos
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric), npos


def voc_evaluate(
    ground_truth: Mapping[Any, Mapping[str, Any]],
    detections: Mapping[Any, Mapping[str, Any]],
    class_names: Sequence[str],
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """VOC mAP and per-class AP (see the module docstring for the exact definition).

    Args:
      ground_truth: {image_id: {"boxes": [N, 4] x1, y1, x2, y2 pixels (as in the XML),
        "labels": [N] ints in 1..C-1, "difficult": [N] bools}}; every evaluated image,
        also those without boxes.
      detections: {image_id: {"boxes": [M, 4] (same convention), "scores": [M],
        "labels": [M]}}; images may be missing (no detections), but not unknown.
      class_names: names of labels 1..C-1 (`class_names[k - 1]` names label k); a
        leading "background" / "__background__" entry is skipped.
      use_07_metric: the VOC2007 11-point AP; False: the area under the curve (VOC2010+).
      iou_threshold: a detection overlaps a box when IoU > this.

    Returns:
      {"mAP": mean AP over the classes with boxes, "AP/<name>": AP (-1: no boxes),
       "num_images", "num_detections"}.
    """
    names = list(class_names)
    if names and str(names[0]).lower() in ("background", "__background__"):
        names = names[1:]
    gt = {k: _as_arrays(v, ("boxes", "labels", "difficult"), f"ground_truth[{k!r}]")
          for k, v in ground_truth.items()}  # fmt: skip
    for v in gt.values():
        v["difficult"] = v["difficult"].astype(bool)
    dets = {}
    for k, v in detections.items():
        if k not in gt:
            raise ValueError(f"detections[{k!r}]: image id not in ground_truth")
        dets[k] = _as_arrays(v, ("boxes", "scores", "labels"), f"detections[{k!r}]")
    for where, table in (("ground_truth", gt), ("detections", dets)):
        for k, v in table.items():
            bad = (v["labels"] < 1) | (v["labels"] > len(names))
            if bad.any():
                raise ValueError(f"{where}[{k!r}]: label {int(v['labels'][bad][0])} outside "
                                 f"1..{len(names)} ({len(names)} class names)")  # fmt: skip
    out: dict[str, float] = {}
    aps = []
    for label, name in enumerate(names, start=1):
        ap, npos = class_ap(gt, dets, label, use_07_metric=use_07_metric,
                            iou_threshold=iou_threshold)  # fmt: skip
        out[f"AP/{name}"] = ap
        if npos:
            aps.append(ap)
    out = {"mAP": float(np.mean(aps)) if aps else -1.0, **out}
    out["num_images"] = float(len(gt))
    out["num_detections"] = float(sum(len(v["scores"]) for v in dets.values()))
    return out


def is_voc(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the dataset's objects carry VOC's `is_difficult` flag."""
    objects = builder.info.features["objects"]
    return "is_difficult" in getattr(objects, "feature", objects).keys()


def voc_ground_truth(builder: tfds.core.DatasetBuilder, split: str) -> dict[int, dict]:
    """VOC ground truth of `split` (see the module docstring), built once per process."""
    key = (str(builder.data_dir), builder.info.full_name, split)
    if key not in _CACHE:
        _CACHE[key] = _build(schema.data_source(builder, split))
    return _CACHE[key]


def _build(source) -> dict[int, dict]:
    out = {}
    for i in range(len(source)):
        rec = source[i]
        hw = records.image_hw(rec["image"])
        if hw is None:
            continue
        obj = rec.get("objects", {})
        yxyx = np.asarray(obj.get("bbox", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        h, w = hw
        boxes = box_ops.yxyx_to_xyxy(yxyx) * np.array([w, h, w, h], np.float64)
        n = len(boxes)
        labels = np.asarray(obj.get("label", np.zeros(0)), np.int64).reshape(-1)[:n] + 1
        hard = np.asarray(obj.get("is_difficult", np.zeros(n, bool)), bool).reshape(-1)[:n]
        name = rec.get("image/filename", b"")
        name = np.asarray(name).item() if isinstance(name, np.ndarray) else name
        name = name.decode() if isinstance(name, bytes) else str(name)
        stem = name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        out[records.image_id(rec)] = {"boxes": boxes, "labels": labels, "difficult": hard,
                                      "name": stem}  # fmt: skip
    return out


def write_voc_results(directory, split: str, dets: dict[int, dict], gt: dict[int, dict],
                      class_names, pixel_offset: int = 1) -> list[str]:  # fmt: skip
    """The VOC devkit's per-class result files, `comp4_det_<split>_<class>.txt`: one line
    per detection, "<image> <score> <x1> <y1> <x2> <y2>", the image as its file stem
    (e.g. 000005) and 1-based pixel corners (the devkit's convention: our 0-based boxes
    + 1 with the original's +1-pixel convention, `pixel_offset` 1). Returns the paths."""
    out = as_path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {c: [] for c in range(1, len(class_names) + 1)}
    for image_id in sorted(dets):
        d = dets[image_id]
        name = gt.get(image_id, {}).get("name") or str(image_id)
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            x1, y1, x2, y2 = (float(v) + pixel_offset for v in box)
            lines[int(label)].append(f"{name} {float(score):.3f} {x1:.1f} {y1:.1f} {x2:.1f} "
                                     f"{y2:.1f}")  # fmt: skip
    paths = []
    for c, name in enumerate(class_names, start=1):
        path = out / f"comp4_det_{split}_{name}.txt"
        path.write_text("".join(f"{line}\n" for line in lines[c]))
        paths.append(str(path))
    return paths


