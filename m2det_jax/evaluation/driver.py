"""Evaluating a model on a split: which metric the dataset gets (COCO's 12 numbers, or VOC
mAP for datasets whose objects carry is_difficult), its ground truth, and the files written.

`evaluate_variables(cfg, variables)` streams the split through `stream.stream_split`, scores
on process 0 with `coco.coco_evaluate` (against the official annotation file where one is
configured, else the ground truth the dataset's own records give) or `voc.voc_evaluate`,
and writes `eval_metrics.json` into the workdir.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np

from m2det_jax import data
from m2det_jax.data import records
from m2det_jax.distributed import guard_compilation_cache
from m2det_jax.evaluation.coco import coco_evaluate, coco_results_array
from m2det_jax.evaluation.pictures import write_pictures
from m2det_jax.evaluation.stream import per_image, stream_split
from m2det_jax.evaluation.voc import is_voc, voc_evaluate, voc_ground_truth, write_voc_results
from m2det_jax.paths import as_path

_log = logging.getLogger(__name__)


def metric_of(cfg, builder) -> str:
    """"voc" or "coco": cfg.data.metric, with "auto" -> voc for VOC-like datasets."""
    metric = cfg.data.metric
    if metric == "auto":
        return "voc" if is_voc(builder) else "coco"
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


def _rows_to_json(rows: np.ndarray) -> list[dict]:
    return [{"image_id": int(r[0]), "category_id": int(r[6]),
             "bbox": [round(float(v), 2) for v in r[1:5]], "score": round(float(r[5]), 5)}
            for r in rows]  # fmt: skip


def evaluate_variables(cfg, variables, step: int | None = None, *, builder=None,
                       workdir: str | None = None, results_file: str | None = None,
                       plots_dir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Metrics of `variables` on cfg.data.eval_split (`metric_of`: COCO's 12 numbers and
    AP per class, or VOC mAP and AP per class); written to `<workdir>/eval_metrics.json`
    when a workdir is given (process 0). `results_file`: every detection also written as a
    COCO results JSON (image_id, category_id, bbox [x, y, w, h], score; what COCO's
    test-dev server takes), and for the VOC metric also the devkit's per-class files in
    `voc_results_folder(results_file)`. A split without any ground-truth box is predicted and its
    results written, not scored: the metrics are then {"scored": False, ...counts}.
    `plots_dir`: the pictures of `evaluation.pictures` (COCO metric) written there."""
    guard_compilation_cache()
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
        if not voc or results_file or plots_dir:  # the valid rows, as [n, 7]
            rows.append(coco_results_array(b["boxes"], b["scores"], b["classes"], b["valid"],
                                           b["image_id"], cats, offset))  # fmt: skip
    metrics: dict[str, Any] = {}
    if main:
        image_ids = np.concatenate(image_ids)
        results = np.concatenate(rows) if rows else np.zeros((0, 7))
        if results_file:
            as_path(results_file).write_text(json.dumps(_rows_to_json(results)))
            _log.info("%d detections of %d images -> %s", len(results), len(image_ids),
                      results_file)  # fmt: skip
        official = None if voc else official_annotations(cfg)
        ann = None if voc else (official or data.ground_truth(builder, split))
        if not voc and not official and not ann["annotations"] and results_file:
            _log.warning("%s split %r has no labels: predicted and written to %s, not scored",
                         cfg.data.dataset, split, results_file)  # fmt: skip
            metrics = {"scored": False, "num_images": int(len(image_ids)),
                       "num_detections": len(results)}  # fmt: skip
        elif voc:
            metrics = voc_metrics_of(cfg, builder, split, voc_dets)
            if plots_dir:
                _log.warning("evaluation pictures are drawn for the COCO metric only")
            if results_file:
                folder = voc_results_folder(results_file)
                write_voc_results(folder, split, voc_dets, voc_ground_truth(builder, split),
                                  data.class_names(builder), offset)  # fmt: skip
                _log.info("VOC per-class result files -> %s", folder)
        else:
            source = official or f"rebuilt from the {cfg.data.dataset} {split} records"
            _log.info("COCO ground truth: %s", source)
            backend = cfg.eval.backend
            only = [int(cats[k - 1]) for k in cfg.postprocess.classes] or None
            keep: dict = {}
            metrics = coco_evaluate(ann, results, image_ids=image_ids, backend=backend,
                                    category_ids=only, keep=keep)  # fmt: skip
            if plots_dir and keep:
                gt = ann if isinstance(ann, dict) else json.loads(as_path(ann).read_text())
                try:  # pictures are never a reason for an evaluation to fail
                    written = write_pictures(plots_dir, gt, results, image_ids, keep,
                                             image_reader(builder, split))  # fmt: skip
                    metrics["plots"] = sorted(written.values())
                    _log.info("evaluation pictures: %s", plots_dir)
                except Exception as e:  # noqa: BLE001
                    _log.warning("evaluation pictures not drawn: %s: %s", type(e).__name__, e)
            metrics["num_images"] = int(len(image_ids))
            metrics["num_detections"] = len(results)
            metrics["ground_truth"] = source
        if workdir:
            out = as_path(workdir) / "eval_metrics.json"
            out.write_text(json.dumps({"step": step, **metrics}, indent=1))
    return metrics


def image_reader(builder, split: str):
    """image_id -> uint8 RGB pixels of `split` (or None), indexed on first use."""
    source = data.data_source(builder, split)
    index: dict[int, int] = {}

    def read(image_id: int):
        if not index:
            for i in range(len(source)):
                index[records.image_id(source[i])] = i
        i = index.get(int(image_id))
        return None if i is None else records.decode_image(source[i]["image"])

    return read


def first_images(builder, split: str, k: int) -> list:
    """The first `k` decodable images of `split` (uint8 RGB)."""
    source, out = data.data_source(builder, split), []
    for i in range(len(source)):
        im = records.decode_image(source[i]["image"])
        if im is not None:
            out.append(im)
        if len(out) == k:
            break
    return out


def voc_results_folder(results_file: str) -> str:
    """Where `evaluate_variables` writes the VOC per-class files beside `results_file`:
    "<results_file without .json>_voc"."""
    path = str(results_file)
    return (path[:-5] if path.endswith(".json") else path) + "_voc"


def voc_metrics(cfg, builder, split: str, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    """VOC mAP (IoU > 0.5, difficult boxes ignored) of `predict_split` output."""
    return voc_metrics_of(cfg, builder, split, per_image(preds))


def voc_metrics_of(cfg, builder, split: str, dets: dict[int, dict]) -> dict[str, Any]:
    """VOC mAP of per-image detections ({image id: {"boxes", "scores", "labels"}})."""
    gt = voc_ground_truth(builder, split)
    gt = {k: v for k, v in gt.items() if k in dets}  # the images that were evaluated
    names = data.class_names(builder)
    m = voc_evaluate(gt, dets, names, use_07_metric=bool(cfg.data.voc_use_07_metric))
    if cfg.postprocess.classes:  # --classes: the mean over those classes only
        keep = {f"AP/{names[k - 1]}" for k in cfg.postprocess.classes}
        m = {k: v for k, v in m.items() if not k.startswith("AP/") or k in keep}
        aps = [m[k] for k in keep if m[k] >= 0]  # -1: a class without boxes
        m["mAP"] = float(np.mean(aps)) if aps else -1.0
    m["num_images"] = int(m["num_images"])
    m["num_detections"] = int(m["num_detections"])
    return m
