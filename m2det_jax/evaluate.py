"""Batch evaluation: jitted network + detect over an eval split, COCO metrics on host.

Every image of the split is scored exactly once (the last batch is padded and masked);
images without detections still count. Boxes go back to original pixels, classes to
COCO category ids. With `cfg.tta.sizes` / `cfg.tta.flip` every image runs at each size
(and mirrored) and the merged candidates are suppressed once more
(`inference.detect_tta`'s passes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from m2det_jax import sharding as shd
from m2det_jax.coco_eval import coco_evaluate, to_coco_results
from m2det_jax.models import build_model
from m2det_jax.postprocess import make_detect_fn
from m2det_jax.priors import prior_boxes


def make_inference_fn(cfg, mesh=None):
    """jit((variables, images [B,S,S,3], image_sizes [B,2]) -> detections), batch-sharded."""
    model = build_model(cfg)
    priors = jax.numpy.asarray(prior_boxes(cfg))
    detect_fn = make_detect_fn(cfg)

    def infer(variables, images, image_sizes):
        out = model.apply(variables, images, train=False)
        return detect_fn(out["loc"], out["logits"], priors, image_sizes)

    if mesh is None:
        return jax.jit(infer)
    return jax.jit(infer, in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh),
                                        shd.batch_sharding(mesh)))  # fmt: skip


def tta_enabled(cfg) -> bool:
    tta = cfg.get("tta")
    return tta is not None and (bool(tuple(tta.sizes)) or bool(tta.flip))


def predict_split(
    cfg, variables, *, builder=None, split=None, mesh=None
) -> dict[str, np.ndarray]:
    """Detections for every image of `split` (all hosts'): numpy arrays over images."""
    from m2det_jax.data import sources

    builder = builder if builder is not None else sources.open_builder(cfg)
    if tta_enabled(cfg):
        batches = _tta_batches(cfg, variables, builder, split)
    else:
        batches = _plain_batches(cfg, variables, builder, split, mesh or shd.make_mesh())
    rows: dict[str, list] = {k: [] for k in ("boxes", "scores", "classes", "valid", "image_id")}
    for batch, dets in batches:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            dets = multihost_utils.process_allgather(dets, tiled=True)
            extra = multihost_utils.process_allgather(
                {"image_id": batch["image_id"], "mask": batch["mask"]}, tiled=True)
        else:
            dets = jax.device_get(dets)
            extra = {"image_id": batch["image_id"], "mask": batch["mask"]}
        m = np.asarray(extra["mask"], bool)
        for k in ("boxes", "scores", "classes", "valid"):
            rows[k].append(np.asarray(dets[k])[m])
        rows["image_id"].append(np.asarray(extra["image_id"])[m])
    return {k: np.concatenate(v) for k, v in rows.items()}


def _plain_batches(cfg, variables, builder, split, mesh):
    """(this host's batch, detections of the global batch) for every eval batch."""
    from m2det_jax.data import pipeline

    it = pipeline.make_eval_iterator(cfg, builder=builder, split=split)
    infer = make_inference_fn(cfg, mesh)
    variables = shd.replicate(jax.device_get(variables), mesh)
    for _ in range(it.num_batches):
        batch = next(it)
        g = shd.global_batch(
            {"image": batch["image"], "orig_size": batch["orig_size"].astype(np.float32)}, mesh)
        yield batch, infer(variables, g["image"], g["orig_size"])


def _tta_batches(cfg, variables, builder, split):
    """(this host's batch, its detections) with test-time augmentation (cfg.tta).

    One in-order eval iterator per size (the same images, masks and padding in the same
    order, each resized from the original with the eval pipeline's bilinear resize); the
    passes of a batch are merged and suppressed per image on this host's first device (the
    passes are not batch-sharded; every host has the same number of equal batches, so
    `predict_split` gathers them as it does the plain ones).
    """
    from m2det_jax.data import pipeline
    from m2det_jax.inference import cached_decoded_fn, cached_pass_fn, config_for_size

    sizes = tuple(int(v) for v in cfg.tta.sizes) or (int(cfg.model.input_size),)
    flip = bool(cfg.tta.flip)
    its = [
        pipeline.make_eval_iterator(config_for_size(cfg, s), builder=builder, split=split)
        for s in sizes
    ]
    variables = jax.device_put(jax.device_get(variables), jax.local_devices()[0])
    merge = cached_decoded_fn(cfg)
    for _ in range(its[0].num_batches):
        passes, batch = [], None
        for s, it in zip(sizes, its, strict=True):
            batch = next(it)
            passes += cached_pass_fn(cfg, s, flip)(variables, batch["image"])
        boxes = jax.numpy.concatenate([p[0] for p in passes], axis=1)
        scores = jax.numpy.concatenate([p[1] for p in passes], axis=1)
        hw = np.where(batch["mask"][:, None], batch["orig_size"], 1).astype(np.float32)
        yield batch, jax.device_get(merge(boxes, scores, hw))


def evaluate_variables(cfg, variables, step: int | None = None, *, builder=None,
                       workdir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """COCO metrics of `variables` on cfg.data.eval_split; written to
    `<workdir>/eval_metrics.json` when a workdir is given (process 0)."""
    from m2det_jax.data import sources

    builder = builder if builder is not None else sources.open_builder(cfg)
    split = cfg.data.eval_split
    preds = predict_split(cfg, variables, builder=builder, split=split)
    metrics: dict[str, Any] = {}
    if jax.process_index() == 0:
        ann = cfg.data.eval_annotation_file or sources.annotation_file(builder, split)
        results = to_coco_results(
            preds["boxes"], preds["scores"], preds["classes"], preds["valid"],
            preds["image_id"], sources.category_ids(builder),
            cfg.postprocess.pixel_offset)  # fmt: skip
        metrics = coco_evaluate(ann, results, image_ids=preds["image_id"])
        metrics["num_images"] = int(len(preds["image_id"]))
        metrics["num_detections"] = len(results)
        if workdir:
            with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
                json.dump({"step": step, **metrics}, f, indent=1)
    return metrics
