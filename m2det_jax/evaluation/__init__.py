"""Evaluation: `stream` (predictions of a split, compacted on the device, batch by batch),
`coco` / `voc` (ground truth and metric of each protocol), `driver` (which metric a
dataset gets, and `evaluate_variables`)."""

from m2det_jax.evaluation.driver import evaluate_variables, metric_of
from m2det_jax.evaluation.stream import compact_detections, per_image, predict_split, stream_split

__all__ = ["compact_detections", "evaluate_variables", "metric_of", "per_image",
           "predict_split", "stream_split"]
