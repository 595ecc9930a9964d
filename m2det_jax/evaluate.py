"""Batch evaluation of an eval split: `predict` on every batch, COCO or VOC metrics on host 0.

Every image of the split is scored exactly once (the last batch is padded and masked);
images without detections still count. Boxes go back to original pixels, classes to
COCO category ids. With `cfg.tta.sizes` / `cfg.tta.flip` each image runs at every size
(and mirrored), one in-order eval iterator per size, and the merged candidates are
suppressed once more (`predict.make_tta_fn`), batch-sharded like the plain path.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2det_jax import data
from m2det_jax import sharding as shd
from m2det_jax.coco_eval import coco_evaluate, coco_results_array
from m2det_jax.paths import as_path
from m2det_jax.predict import config_for_size, make_predict_fn, make_tta_fn, tta_sizes
from m2det_jax.voc_eval import voc_evaluate

DETECTION_KEYS = ("boxes", "scores", "classes", "valid")


def predict_split(
    cfg, variables, *, builder=None, split=None, mesh=None
) -> dict[str, np.ndarray]:
    """Detections for every image of `split` (all hosts'): numpy arrays over images,
    {"boxes", "scores", "classes", "valid", "image_id"}."""
    builder = builder if builder is not None else data.open_builder(cfg)
    mesh = mesh or shd.make_mesh()
    sizes = tta_sizes(cfg)
    cfgs = [config_for_size(cfg, s) for s in sizes] or [cfg]
    its = [data.make_eval_iterator(c, builder=builder, split=split) for c in cfgs]
    fn = make_tta_fn(cfg, sizes, mesh=mesh) if sizes else make_predict_fn(cfg, mesh)
    variables = shd.replicate(jax.device_get(variables), mesh)
    rows: dict[str, list] = {k: [] for k in (*DETECTION_KEYS, "image_id")}
    for _ in range(its[0].num_batches):
        batches = [next(it) for it in its]  # the same images, in the same order, per size
        batch = batches[0]
        image_sizes = np.where(batch["mask"][:, None], batch["image_sizes"], 1)
        g = shd.global_batch({"image_sizes": image_sizes.astype(np.float32),
                              **{f"image{i}": b["image"] for i, b in enumerate(batches)}},
                             mesh)  # fmt: skip
        images = tuple(g[f"image{i}"] for i in range(len(batches)))
        dets = fn(variables, images if sizes else images[0], g["image_sizes"])
        dets = {k: dets[k] for k in DETECTION_KEYS}
        extra = {"image_id": batch["image_id"], "mask": batch["mask"]}
        if jax.process_count() > 1:
            dets = multihost_utils.process_allgather(dets, tiled=True)
            extra = multihost_utils.process_allgather(extra, tiled=True)
        else:
            dets = jax.device_get(dets)
        m = np.asarray(extra["mask"], bool)
        for k in DETECTION_KEYS:
            rows[k].append(np.asarray(dets[k])[m])
        rows["image_id"].append(np.asarray(extra["image_id"])[m])
    return {k: np.concatenate(v) for k, v in rows.items()}


def metric_of(cfg, builder) -> str:
    """"voc" or "coco": cfg.data.metric, with "auto" -> voc for VOC-like datasets."""
    metric = cfg.data.get("metric", "auto")
    if metric == "auto":
        return "voc" if data.is_voc(builder) else "coco"
    return metric


def official_annotations(cfg) -> str | None:
    """cfg.data.eval_annotation_file when it is the ground truth to score against (e.g.
    instances_val2017.json for coco/2017); None otherwise. A coco_folder's file is its
    build input: it is scored through the ground truth rebuilt from the stored records,
    normalised once at the data boundary (missing iscrowd -> 0, missing area -> the box's),
    so any JSON that builds and trains also evaluates."""
    if cfg.data.dataset == "coco_folder":
        return None
    return cfg.data.eval_annotation_file or None


def evaluate_variables(cfg, variables, step: int | None = None, *, builder=None,
                       workdir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Metrics of `variables` on cfg.data.eval_split (`metric_of`: COCO's 12 numbers and
    AP per class, or VOC mAP and AP per class); written to `<workdir>/eval_metrics.json`
    when a workdir is given (process 0)."""
    builder = builder if builder is not None else data.open_builder(cfg)
    split = cfg.data.eval_split
    preds = predict_split(cfg, variables, builder=builder, split=split)
    metrics: dict[str, Any] = {}
    if jax.process_index() == 0:
        if metric_of(cfg, builder) == "voc":
            metrics = voc_metrics(cfg, builder, split, preds)
        else:
            official = official_annotations(cfg)
            ann = official or data.ground_truth(builder, split)
            source = official or f"rebuilt from the {cfg.data.dataset} {split} records"
            print(f"COCO ground truth: {source}", flush=True)
            results = coco_results_array(
                preds["boxes"], preds["scores"], preds["classes"], preds["valid"],
                preds["image_id"], data.category_ids(builder),
                cfg.postprocess.pixel_offset)  # fmt: skip
            backend = cfg.get("eval", {}).get("backend", "faster_coco_eval")
            metrics = coco_evaluate(ann, results, image_ids=preds["image_id"], backend=backend)
            metrics["num_images"] = int(len(preds["image_id"]))
            metrics["num_detections"] = len(results)
            metrics["ground_truth"] = source
        if workdir:
            out = as_path(workdir) / "eval_metrics.json"
            out.write_text(json.dumps({"step": step, **metrics}, indent=1))
    return metrics


def voc_metrics(cfg, builder, split: str, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    """VOC mAP (IoU > 0.5, difficult boxes ignored) of `predict_split` output."""
    gt = data.voc_ground_truth(builder, split)
    dets = {}
    for i, image_id in enumerate(preds["image_id"].tolist()):
        keep = preds["valid"][i]
        dets[image_id] = {"boxes": preds["boxes"][i][keep], "scores": preds["scores"][i][keep],
                          "labels": preds["classes"][i][keep]}  # fmt: skip
    gt = {k: v for k, v in gt.items() if k in dets}  # the images that were evaluated
    m = voc_evaluate(gt, dets, data.class_names(builder),
                     use_07_metric=bool(cfg.data.get("voc_use_07_metric", True)))  # fmt: skip
    m["num_images"] = int(m["num_images"])
    m["num_detections"] = int(m["num_detections"])
    return m
