"""Input data: TFDS builders (shapes, coco_folder), COCO reading, augmentation, batching.

Entry points: `pipeline.make_train_iterator`, `pipeline.make_eval_iterator`,
`sources.open_builder`, `sources.annotation_file`, `sources.category_ids`.
"""

from m2det_jax.data.pipeline import (
    DataStats,
    DetectionIterator,
    make_eval_iterator,
    make_train_iterator,
)
from m2det_jax.data.sources import annotation_file, category_ids, open_builder

__all__ = [
    "DataStats",
    "DetectionIterator",
    "annotation_file",
    "category_ids",
    "make_eval_iterator",
    "make_train_iterator",
    "open_builder",
]
