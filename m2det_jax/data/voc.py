"""PASCAL VOC ground truth of a prepared builder, for `m2det_jax.voc_eval`.

A dataset is VOC-like when its objects carry `is_difficult` (TFDS `voc/2007`,
`voc/2012`, and `voc_folder` builds). `voc_ground_truth(builder, split)` reads the stored
records themselves, so the metric scores against exactly what the pipeline reads:

    {image_id: {"boxes": float [N, 4] x1, y1, x2, y2 pixels, "labels": int [N] in 1..C-1,
                "difficult": bool [N]}}

Pixels are the stored normalized boxes times the image size: the XML's coordinates for
TFDS voc and voc_folder builds (both store them unshifted). Images that do not decode
are left out, as the pipeline skips them.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from m2det_jax import box_ops
from m2det_jax.data import records, schema


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


_CACHE: dict[tuple[str, str, str], dict] = {}


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
        out[records.image_id(rec)] = {"boxes": boxes, "labels": labels, "difficult": hard}
    return out
