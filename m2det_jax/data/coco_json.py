"""COCO metadata of a prepared builder: category ids, and an instances JSON for evaluation.

`category_ids(builder)[label]` is the COCO category id of TFDS label `label` (model label
- 1). `ground_truth(builder, split)` is the COCO-format ground truth built from the stored
records themselves, so the evaluator scores against exactly what the pipeline reads;
`annotation_file(builder, split)` writes it as `instances_<split>.json` for the builds
that own their folder.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds

from m2det_jax.core import box_ops
from m2det_jax.data import records, schema
from m2det_jax.paths import as_path, write_text_atomic


def category_ids(builder: tfds.core.DatasetBuilder) -> list[int]:
    """COCO category id per contiguous TFDS label (model label - 1).

    From `info.metadata["category_ids"]` when the builder stored them (shapes,
    coco_folder); for an 80-class set (coco/2017) by name, else in COCO 2017's id order;
    otherwise 1..C.
    """
    meta = builder.info.metadata
    if meta is not None and "category_ids" in meta:
        return [int(i) for i in meta["category_ids"]]
    names = schema.class_names(builder)
    by_name = {n: i for i, n in schema.COCO_2017_CATEGORIES}
    norm = [n.replace("_", " ").lower() for n in names]
    if len(names) == 80 and all(n in by_name for n in norm):
        return [by_name[n] for n in norm]
    if len(names) == 80:
        return list(schema.COCO_2017_CATEGORY_IDS)
    return list(range(1, len(names) + 1))


def _column(objects: dict, key: str, n: int, default) -> np.ndarray:
    """objects[key] as a flat array of n entries, or n copies of `default` if absent."""
    if key in objects:
        return np.asarray(objects[key]).reshape(-1)[:n]
    return np.full(n, default)


def _annotations(record: dict, height: int, width: int, cat_ids: list[int]) -> list[dict]:
    """COCO annotation dicts of one record's stored, non-empty boxes (id 0: not stored)."""
    obj = record["objects"]
    xyxy = box_ops.yxyx_to_xyxy(np.asarray(obj["bbox"], np.float64).reshape(-1, 4))
    n = len(xyxy)
    real = (box_ops.xyxy_to_xywh(xyxy)[:, 2:] > 0).all(axis=1)  # stored-empty: not GT
    xywh = box_ops.xyxy_to_xywh(xyxy * np.array([width, height, width, height], np.float64))
    area = _column(obj, "area", n, np.nan).astype(np.float64)
    area = np.where(np.isnan(area), xywh[:, 2] * xywh[:, 3], area)
    labels = _column(obj, "label", n, 0).astype(np.int64)
    ann_ids = _column(obj, "id", n, 0).astype(np.int64)
    crowd = _column(obj, "is_crowd", n, False).astype(bool)
    # VOC's difficult objects: ignored by the VOC metric, so ignore regions for COCO's too.
    crowd |= _column(obj, "is_difficult", n, False).astype(bool)
    return [
        {
            "id": int(ann_ids[k]),
            "image_id": records.image_id(record),
            "category_id": cat_ids[int(labels[k])],
            "bbox": [float(v) for v in xywh[k]],
            "area": float(area[k]),
            "iscrowd": int(crowd[k]),
        }
        for k in np.flatnonzero(real)
    ]


def ground_truth(builder: tfds.core.DatasetBuilder, split: str) -> dict:
    """The COCO-format ground truth of `split` as a dict (what `instances_<split>.json`
    holds), built from the stored records so it matches what the pipeline reads.

    Read from `builder.data_dir/instances_<split>.json` when a build wrote one (shapes,
    coco_folder); otherwise built in memory, once per process, and never written: a
    prepared data_dir may be read-only or shared. bbox in COCO xywh pixels, category ids
    from `category_ids(builder)`; images that do not decode are left out (the pipeline
    skips them too).
    """
    path = as_path(builder.data_dir) / f"instances_{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    key = (str(builder.data_dir), builder.info.full_name, split)
    if key not in _GROUND_TRUTH:
        _GROUND_TRUTH[key] = _build_ground_truth(builder, split)
    return _GROUND_TRUTH[key]


_GROUND_TRUTH: dict[tuple[str, str, str], dict] = {}  # built once per process


def _build_ground_truth(builder: tfds.core.DatasetBuilder, split: str) -> dict:
    source = schema.data_source(builder, split)
    cat_ids = category_ids(builder)
    images, annotations = [], []
    for i in range(len(source)):
        rec = source[i]
        hw = records.image_hw(rec["image"])
        if hw is None:  # corrupt images are not evaluated
            continue
        image_id = records.image_id(rec)
        fname = rec.get("image/filename", b"")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        images.append({"id": image_id, "file_name": fname, "height": hw[0], "width": hw[1]})
        for ann in _annotations(rec, *hw, cat_ids):
            ann["id"] = ann["id"] or len(annotations) + 1  # not stored: 1-based position
            annotations.append(ann)
    names = schema.class_names(builder)
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names, strict=True)],
    }


def annotation_file(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """Path of `instances_<split>.json` (`ground_truth`) in `builder.data_dir`, written if
    absent. For the builds that own their folder (shapes, coco_folder); evaluation of a
    prepared dataset uses `ground_truth`, which writes nothing."""
    path = as_path(builder.data_dir) / f"instances_{split}.json"
    if not path.exists():
        write_text_atomic(path, json.dumps(_build_ground_truth(builder, split)))
    return str(path)
