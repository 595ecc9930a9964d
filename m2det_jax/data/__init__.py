"""Input data, in data-flow order (each module imports only modules above it):

  records      one stored record -> example (OpenCV; no TFDS): decode_record, decode_image
  schema       the coco/2017-like TFDS features, prepare, data_source
  coco_json    category_ids, ground_truth (COCO dict from the records), annotation_file
  voc          VOC ground truth of a prepared builder (is_voc, voc_ground_truth)
  shapes       the synthetic shapes builder (build_shapes)
  coco_folder  a builder for any COCO-format folder (build_coco_folder)
  voc_folder   a builder for any VOC-format folder (build_voc_folder)
  builders     cfg.data.dataset -> prepared builder (open_builder), train_source,
               dataset_labels, known_labels
  augment      train augmentation, eval resize (OpenCV, on the host)
  device_augment  the same augmentation batched in JAX, inside the jitted train step
  examples     per-example grain transforms (decode, augment or place on a canvas, pad)
  iterator     batching, state, DataStats (DetectionIterator)
  pipeline     make_train_iterator, make_eval_iterator

The package exports `__all__` (`from m2det_jax import data; data.open_builder(cfg)`),
each loaded from its module on first use, so importing `m2det_jax.data.records` (e.g.
to decode an image for inference) does not import TFDS or grain.
"""

from __future__ import annotations

import importlib

# Exported name -> the module that defines it.
_EXPORTS = {
    "decode_image": "records",
    "decode_record": "records",
    "data_source": "schema",
    "annotation_file": "coco_json",
    "ground_truth": "coco_json",
    "category_ids": "coco_json",
    "class_names": "schema",
    "is_voc": "voc",
    "voc_ground_truth": "voc",
    "open_builder": "builders",
    "dataset_labels": "builders",
    "known_labels": "builders",
    "train_source": "builders",
    "DataStats": "iterator",
    "DetectionIterator": "iterator",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy exports (PEP 562): an eager import here would pull TFDS and grain into every
    # `import m2det_jax.data.<module>`, including the light records / augment modules.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
