"""Seeing the data before training on it: `m2det browse --config ... --workdir OUT`.

Writes to OUT/browse:
* `batch_<k>.png`: the first images of training batches as the network gets them (the
  real input pipeline; with `data.augment_on_device` also after the device augmentation,
  `batch_<k>_device.png`), each with its boxes and class names;
* `report.md` / `report.json`: class counts; box sizes (sqrt(w * h) in input pixels) and
  aspect ratios against the priors'; priors matched per object by the loss's rule
  (`train.losses.match`: a prior is positive for the object it overlaps most if that IoU
  is >= `loss.overlap_thresh`, and every object keeps its best prior), objects matched only
  by that forced best prior (no prior reaches the threshold), and a one-line verdict;
* `box_sizes.png`: the histograms of box sizes and aspect ratios with the priors' own.

The statistics read the training split's stored boxes (the first `max_images` images),
which the training resize maps to the square input unchanged in normalised coordinates.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from m2det_jax import data
from m2det_jax.core import box_ops
from m2det_jax.core.priors import prior_boxes
from m2det_jax.evaluation.pictures import save_png
from m2det_jax.inference.image_files import draw_detections
from m2det_jax.paths import as_path
from m2det_jax.train.losses import match
from m2det_jax.train.step import device_augment

# The verdict's thresholds: share of objects no prior reaches at the matching IoU, and the
# median count of positive priors per object below which training is slow to start (the
# shapes set's plateau: ~1.6 positives per object, docs/training.md).
POOR_UNREACHED = 0.10
POOR_MEDIAN = 3


def object_matches(boxes: np.ndarray, valid: np.ndarray, priors: np.ndarray, thresh: float):
    """Per object of each image: the positive priors it gets by the loss's matching rule,
    and whether some prior reaches `thresh` by itself.

    Args:
      boxes: [B, M, 4] normalised xyxy; valid: [B, M]; priors: [P, 4] (cx, cy, w, h).
    Returns:
      (positives [n], reached [n]) over the valid objects.
    """
    pr = np.asarray(box_ops.cxcywh_to_xyxy(jnp.asarray(priors)))
    iou = np.asarray(jax.vmap(lambda b: box_ops.iou(b, jnp.asarray(pr)))(jnp.asarray(boxes)))
    iou = np.where(valid[:, :, None], iou, -1.0)  # [B, M, P]
    best_obj = iou.argmax(axis=1)  # [B, P]: the object each prior overlaps most
    best_iou = iou.max(axis=1)
    forced = iou.argmax(axis=2)  # [B, M]: each object's best prior
    pos, reached = [], []
    for b in range(len(boxes)):
        owner = np.where(best_iou[b] >= thresh, best_obj[b], -1)
        owner[forced[b][valid[b]]] = np.flatnonzero(valid[b])  # the forced best prior
        for m in np.flatnonzero(valid[b]):
            pos.append(int((owner == m).sum()))
            reached.append(bool(iou[b, m].max() >= thresh))
    return np.asarray(pos), np.asarray(reached)


def _stored_boxes(cfg, builder, max_images: int):
    """[B, M, 4] boxes, [B, M] labels (1..C-1), [B, M] valid of the first training images."""
    source = data.train_source(cfg, builder)
    n = min(len(source), max_images)
    m = max(1, max(len(np.asarray(source[i]["objects"]["bbox"]).reshape(-1, 4)) for i in range(n)))
    boxes, labels = np.zeros((n, m, 4), np.float32), np.zeros((n, m), np.int32)
    valid = np.zeros((n, m), bool)
    for i in range(n):
        obj = source[i]["objects"]
        b = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
        boxes[i, : len(b)] = box_ops.yxyx_to_xyxy(b)
        labels[i, : len(b)] = np.asarray(obj["label"]).reshape(-1)[: len(b)] + 1
        valid[i, : len(b)] = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return boxes, labels, valid


def data_report(cfg, builder, max_images: int = 2000) -> dict:
    """The statistics of the module docstring, as a dict (what report.json holds)."""
    names = data.class_names(builder)
    boxes, labels, valid = _stored_boxes(cfg, builder, max_images)
    s = float(cfg.model.input_size)
    priors = np.asarray(prior_boxes(cfg))
    thresh = float(cfg.loss.overlap_thresh)
    pos, reached = object_matches(boxes, valid, priors, thresh)
    _, conf_t = match(jnp.asarray(priors), jnp.asarray(boxes), jnp.asarray(labels),
                      jnp.asarray(valid), thresh)  # fmt: skip
    wh = (boxes[..., 2:] - boxes[..., :2])[valid] * s
    size, aspect = np.sqrt(wh[:, 0] * wh[:, 1]), wh[:, 0] / np.maximum(wh[:, 1], 1e-6)
    prior_size = np.sqrt(priors[:, 2] * priors[:, 3]) * s
    counts = np.bincount(labels[valid], minlength=len(names) + 1)[1:]
    unreached = float(1 - reached.mean()) if len(reached) else 0.0
    median = float(np.median(pos)) if len(pos) else 0.0
    report = {
        "images": int(len(boxes)), "objects": int(valid.sum()),
        "class_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "box_size_px": _quantiles(size), "box_aspect_w_over_h": _quantiles(aspect),
        "prior_sizes_px": sorted({round(float(v), 1) for v in prior_size}),
        "overlap_thresh": thresh,
        "positives_per_object": {"mean": float(pos.mean()) if len(pos) else 0.0,
                                 "median": median, "total": int(pos.sum()),
                                 "total_by_the_loss": int((np.asarray(conf_t) > 0).sum())},
        "objects_no_prior_reaches": unreached,
        "smallest_prior_px": float(prior_size.min()),
    }  # fmt: skip
    report["verdict"] = verdict(report)
    report["_arrays"] = {"size": size, "aspect": aspect, "prior_size": prior_size,
                         "prior_aspect": priors[:, 2] / priors[:, 3], "positives": pos}
    return report


def _quantiles(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"p5": round(float(q[0]), 2), "median": round(float(q[1]), 2),
            "p95": round(float(q[2]), 2)}  # fmt: skip


def verdict(r: dict) -> str:
    """One line: do the priors cover the boxes?"""
    unreached, median = r["objects_no_prior_reaches"], r["positives_per_object"]["median"]
    if unreached > POOR_UNREACHED or median < POOR_MEDIAN:
        small = r["box_size_px"].get("p5", 0)
        return (f"anchors cover the data poorly: {unreached:.0%} of objects reach no prior at "
                f"IoU {r['overlap_thresh']} and an object gets {median:g} positive priors "
                f"(median); boxes: 5% under {small:g} px, median {r['box_size_px']['median']:g}"
                f" px; priors from {r['smallest_prior_px']:.0f} px: try anchors.size_pattern "
                "closer to the box sizes (denser), or a lower loss.overlap_thresh")  # fmt: skip
    return (f"anchors cover the data: {1 - unreached:.0%} of objects reach a prior at IoU "
            f"{r['overlap_thresh']}, {median:g} positive priors per object (median)")


def sizes_figure(r: dict) -> Figure:
    a = r["_arrays"]
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(a["size"], bins=40, color="tab:blue", alpha=0.8, label="boxes")
    for v in r["prior_sizes_px"]:
        ax.axvline(v, color="tab:red", lw=0.8)
    ax.set(xlabel="sqrt(w h), input pixels", ylabel="objects",
           title="box sizes (red: prior sizes)")  # fmt: skip
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(np.log2(a["aspect"]), bins=40, color="tab:blue", alpha=0.8)
    for v in sorted(set(np.round(np.log2(a["prior_aspect"]), 2))):
        ax.axvline(v, color="tab:red", lw=0.8)
    ax.set(xlabel="log2(w / h)", title="aspect ratios (red: priors')")
    fig.tight_layout()
    return fig


def batch_figure(images, boxes, labels, valid, names, count: int = 8) -> Figure:
    n = min(count, len(images))
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3 * cols, 3 * rows))
    for i in range(n):
        h, w = images[i].shape[:2]
        recs = [{"box": list(b * np.array([w, h, w, h])), "class": int(c), "score": None,
                 "label": names[int(c) - 1] if 0 < int(c) <= len(names) else str(int(c))}
                for b, c, v in zip(boxes[i], labels[i], valid[i], strict=True) if v]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(draw_detections(np.asarray(images[i], np.uint8), recs)))
        ax.set_title(f"{len(recs)} objects", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def browse(cfg, out_dir, batches: int = 2, max_images: int = 2000) -> dict[str, str]:
    """Writes the files of the module docstring to out_dir; returns {what: path}."""
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = data.open_builder(cfg)
    names = data.class_names(builder)
    written = {}
    it = data.make_train_iterator(cfg, builder=builder, global_batch_size=cfg.train.batch_size,
                                  shard_index=0, shard_count=1, num_workers=0)  # fmt: skip
    for k in range(batches):
        b = next(it)
        if "canvas_sizes" in b:  # augment_on_device: the canvas, then the device's result
            written[f"batch_{k}"] = save_png(batch_figure(b["image"], b["boxes"], b["labels"],
                                                       b["valid"], names), out / f"batch_{k}.png")
            img, bx, lb, va = jax.device_get(device_augment(cfg, b, jnp.int32(k)))
            written[f"batch_{k}_device"] = save_png(batch_figure(img, bx, lb, va, names),
                                                 out / f"batch_{k}_device.png")  # fmt: skip
        else:
            written[f"batch_{k}"] = save_png(batch_figure(b["image"], b["boxes"], b["labels"],
                                                       b["valid"], names), out / f"batch_{k}.png")
    r = data_report(cfg, builder, max_images)
    written["box_sizes"] = save_png(sizes_figure(r), out / "box_sizes.png")
    public = {k: v for k, v in r.items() if not k.startswith("_")}
    (out / "report.json").write_text(json.dumps(public, indent=1))
    lines = [f"# Data report: {cfg.data.dataset} {cfg.data.train_split}", "",
             f"**{r['verdict']}**", "",
             f"{r['images']} images, {r['objects']} objects; box size (px, sqrt(w h) at input "
             f"{cfg.model.input_size}) {r['box_size_px']}; aspect (w/h) "
             f"{r['box_aspect_w_over_h']}; prior sizes {r['prior_sizes_px']}.", "",
             f"Positive priors per object at IoU {r['overlap_thresh']}: mean "
             f"{r['positives_per_object']['mean']:.2f}, median "
             f"{r['positives_per_object']['median']:g}; objects no prior reaches: "
             f"{r['objects_no_prior_reaches']:.1%}.", "", "| class | objects |", "|---|---|"]
    lines += [f"| {n} | {c} |" for n, c in r["class_counts"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written["report"] = os.fspath(out / "report.md")
    return written
