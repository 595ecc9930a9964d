"""Predictions of a whole eval split, batch by batch: `predict` on every batch, compacted on
the device, gathered on process 0.

Every image of the split is scored exactly once (the last batch is padded and masked);
images without detections still count. Boxes go back to original pixels, classes to
COCO category ids. With `cfg.tta.sizes` / `cfg.tta.flip` each image runs at every size
(and mirrored), one in-order eval iterator per size, and the merged candidates are
suppressed once more (`inference.predict.make_tta_fn`), batch-sharded like the plain path.

Streaming: each batch's detections are compacted on the device (valid rows first, at most
cfg.eval.max_detections per image), gathered from every host, and process 0 turns only
the valid rows into the COCO results array ([n, 7] per batch) or VOC's per-image lists
before the next batch: host memory follows the number of detections, not images x K.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from m2det_jax import data
from m2det_jax import distributed as shd
from m2det_jax.inference.predict import config_for_size, make_predict_fn, make_tta_fn, tta_sizes
from m2det_jax.inference.variables import prepare_variables

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
                                        cap=int(cfg.eval.max_detections)))
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


def per_image(preds: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """{image id: {"boxes", "scores", "labels"}} of the valid rows of detections."""
    out = {}
    for i, image_id in enumerate(preds["image_id"].tolist()):
        keep = preds["valid"][i]
        out[image_id] = {"boxes": preds["boxes"][i][keep], "scores": preds["scores"][i][keep],
                         "labels": preds["classes"][i][keep]}  # fmt: skip
    return out
