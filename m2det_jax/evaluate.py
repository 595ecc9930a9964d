"""Batch evaluation of an eval split: `predict` on every batch, COCO or VOC metrics on host 0.

Every image of the split is scored exactly once (the last batch is padded and masked);
images without detections still count. Boxes go back to original pixels, classes to
COCO category ids. With `cfg.tta.sizes` / `cfg.tta.flip` each image runs at every size
(and mirrored), one in-order eval iterator per size, and the merged candidates are
suppressed once more (`predict.make_tta_fn`), batch-sharded like the plain path.

Streaming: each batch's detections are compacted on the device (valid rows first, at most
cfg.eval.max_detections per image), gathered from every host, and process 0 turns only
the valid rows into the COCO results array ([n, 7] per batch) or VOC's per-image lists
before the next batch: host memory follows the number of detections, not images x K.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from m2det_jax import data
from m2det_jax import sharding as shd
from m2det_jax.coco_eval import coco_evaluate, coco_results_array
from m2det_jax.paths import as_path
from m2det_jax.predict import (
    config_for_size,
    make_predict_fn,
    make_tta_fn,
    prepare_variables,
    tta_sizes,
)
from m2det_jax.voc_eval import voc_evaluate

DETECTION_KEYS = ("boxes", "scores", "classes", "valid")


def compact_detections(dets: dict[str, jax.Array], cap: int) -> dict[str, jax.Array]:
    """On the device: each image's `cap` highest-scoring valid rows, in their original
    order ([B, cap, ...]), plus `count` [B] of valid rows kept. cap <= 0 or >= K keeps
    all K rows as they are (nothing dropped; the host keeps the valid ones)."""
    valid = dets["valid"]
    out = {key: dets[key] for key in DETECTION_KEYS}
    if 0 < cap < valid.shape[1]:
        key = jnp.where(valid, dets["scores"], -jnp.inf)
        idx = jnp.sort(jax.lax.top_k(key, cap)[1], axis=1)
        out = {k: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
               for k, a in out.items()}  # fmt: skip
    out["count"] = out["valid"].sum(axis=1).astype(jnp.int32)
    return out


def stream_split(cfg, variables, *, builder=None, split=None, mesh=None
                 ) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """Detections of `split`, one eval batch at a time: numpy {"boxes", "scores",
    "classes", "valid" [n, cap, ...], "count", "image_id" [n]} for the n real images of
    the batch on every host (padding dropped). Compacted on the device first
    (`compact_detections`, cap = cfg.eval.max_detections), so the host only receives and
    keeps rows, per batch: memory does not grow with the split. With several processes
    every one takes part (a collective per batch) and gets every host's rows."""
    builder = builder if builder is not None else data.open_builder(cfg)
    mesh = mesh or shd.make_mesh()
    sizes = tta_sizes(cfg)
    cfgs = [config_for_size(cfg, s) for s in sizes] or [cfg]
    its = [data.make_eval_iterator(c, builder=builder, split=split) for c in cfgs]
    fn = make_tta_fn(cfg, sizes, mesh=mesh) if sizes else make_predict_fn(cfg, mesh)
    compact = jax.jit(functools.partial(compact_detections,
                                        cap=int(cfg.get("eval", {}).get("max_detections", 0))))
    variables = prepare_variables(cfg, variables, mesh)
    for _ in range(its[0].num_batches):
        batches = [next(it) for it in its]  # the same images, in the same order, per size
        batch = batches[0]
        image_sizes = np.where(batch["mask"][:, None], batch["image_sizes"], 1)
        g = shd.global_batch({"image_sizes": image_sizes.astype(np.float32),
                              **{f"image{i}": b["image"] for i, b in enumerate(batches)}},
                             mesh)  # fmt: skip
        images = tuple(g[f"image{i}"] for i in range(len(batches)))
        dets = compact(fn(variables, images if sizes else images[0], g["image_sizes"]))
        extra = {"image_id": batch["image_id"], "mask": batch["mask"]}
        if jax.process_count() > 1:
            dets = multihost_utils.process_allgather(dets, tiled=True)
            extra = multihost_utils.process_allgather(extra, tiled=True)
        else:
            dets = jax.device_get(dets)
        m = np.asarray(extra["mask"], bool)
        out = {k: np.asarray(v)[m] for k, v in dets.items()}
        out["image_id"] = np.asarray(extra["image_id"])[m]
        yield out


def predict_split(cfg, variables, *, builder=None, split=None, mesh=None
                  ) -> dict[str, np.ndarray]:  # fmt: skip
    """`stream_split` gathered: numpy arrays over all images of `split` (all hosts'),
    {"boxes", "scores", "classes", "valid", "count", "image_id"}."""
    batches = list(stream_split(cfg, variables, builder=builder, split=split, mesh=mesh))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


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
    voc = metric_of(cfg, builder) == "voc"
    main = jax.process_index() == 0
    cats, offset = data.category_ids(builder), cfg.postprocess.pixel_offset
    rows, image_ids, voc_dets = [], [], {}
    for b in stream_split(cfg, variables, builder=builder, split=split):
        if not main:
            continue  # every process runs the batches; process 0 scores them
        image_ids.append(b["image_id"])
        if voc:
            voc_dets.update(per_image(b))
        else:  # only the valid rows, as [n, 7]: memory follows the detections
            rows.append(coco_results_array(b["boxes"], b["scores"], b["classes"], b["valid"],
                                           b["image_id"], cats, offset))  # fmt: skip
    metrics: dict[str, Any] = {}
    if main:
        image_ids = np.concatenate(image_ids)
        if voc:
            metrics = voc_metrics_of(cfg, builder, split, voc_dets)
        else:
            official = official_annotations(cfg)
            ann = official or data.ground_truth(builder, split)
            source = official or f"rebuilt from the {cfg.data.dataset} {split} records"
            print(f"COCO ground truth: {source}", flush=True)
            results = np.concatenate(rows)
            backend = cfg.get("eval", {}).get("backend", "faster_coco_eval")
            metrics = coco_evaluate(ann, results, image_ids=image_ids, backend=backend)
            metrics["num_images"] = int(len(image_ids))
            metrics["num_detections"] = len(results)
            metrics["ground_truth"] = source
        if workdir:
            out = as_path(workdir) / "eval_metrics.json"
            out.write_text(json.dumps({"step": step, **metrics}, indent=1))
    return metrics


def per_image(preds: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """{image id: {"boxes", "scores", "labels"}} of the valid rows of detections."""
    out = {}
    for i, image_id in enumerate(preds["image_id"].tolist()):
        keep = preds["valid"][i]
        out[image_id] = {"boxes": preds["boxes"][i][keep], "scores": preds["scores"][i][keep],
                         "labels": preds["classes"][i][keep]}  # fmt: skip
    return out


def voc_metrics(cfg, builder, split: str, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    """VOC mAP (IoU > 0.5, difficult boxes ignored) of `predict_split` output."""
    return voc_metrics_of(cfg, builder, split, per_image(preds))


def voc_metrics_of(cfg, builder, split: str, dets: dict[int, dict]) -> dict[str, Any]:
    """VOC mAP of per-image detections ({image id: {"boxes", "scores", "labels"}})."""
    gt = data.voc_ground_truth(builder, split)
    gt = {k: v for k, v in gt.items() if k in dets}  # the images that were evaluated
    m = voc_evaluate(gt, dets, data.class_names(builder),
                     use_07_metric=bool(cfg.data.get("voc_use_07_metric", True)))  # fmt: skip
    m["num_images"] = int(m["num_images"])
    m["num_detections"] = int(m["num_detections"])
    return m
