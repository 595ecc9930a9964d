"""Input data, in data-flow order (each module imports only modules above it):

  records      one stored record -> example (OpenCV; no TFDS): decode_record, decode_image
  schema       the coco/2017-like TFDS features, prepare, data_source
  coco_json    category_ids, ground_truth (COCO dict from the records), annotation_file
  sources/     the builders we generate: shapes (build_shapes), coco_folder
               (build_coco_folder), voc_folder (build_voc_folder), yolo_folder
               (build_yolo_folder)
  builders     cfg.data.dataset -> prepared builder (open_builder), train_source,
               dataset_labels, known_labels
  augment_host    train augmentation (OpenCV, on the host)
  augment_device  the same augmentation batched in JAX, inside the jitted train step
  worker_guard grain worker processes end with the process they feed (kill -9)
  examples     per-example grain transforms (decode, augment or place on a canvas, pad)
  iterator     batching, state, DataStats (DetectionIterator)
  pipeline     make_train_iterator, make_eval_iterator
  device_feed  global batches placed on the devices ahead of the step (DevicePrefetch)

The package exports `__all__` (`from m2det_jax import data; data.open_builder(cfg)`),
each loaded from its module on first use, so importing `m2det_jax.data.records` (e.g.
to decode an image for inference) does not import TFDS or grain.
"""

from m2det_jax._compat import lazy_exports

# Exported name -> the module that defines it.
_EXPORTS = {
    "decode_image": "records",
    "decode_record": "records",
    "data_source": "schema",
    "annotation_file": "coco_json",
    "ground_truth": "coco_json",
    "category_ids": "coco_json",
    "class_names": "schema",
    "open_builder": "builders",
    "dataset_labels": "builders",
    "known_labels": "builders",
    "train_source": "builders",
    "DataStats": "iterator",
    "DetectionIterator": "iterator",
    "DevicePrefetch": "device_feed",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
