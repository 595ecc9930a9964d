"""Inputs and timers that make accelerator figures interpretable (benchmarks/device_check.py).

Soft-NMS work depends on how many (prior, class) scores pass `postprocess.score_threshold`,
and a network with random weights gives an arbitrary number (usually none: its softmax is
nearly uniform). The device check therefore feeds the post-processing a network output of
known shape and reports the candidate count beside every NMS time:

* `detection_shaped`: what a trained detector gives on a typical COCO image: `objects`
  objects (COCO averages ~7 per image), each seen by the priors that overlap it (IoU >=
  0.35) with a score rising with the overlap, plus a weaker second class on some of them;
  background everywhere else.
* `dense_worst_case`: every class has more candidates than `candidates_per_class` keeps,
  i.e. the most NMS work the settings allow.

`fused_inference_fn` is the paper protocol's program (network + decode + NMS in one jit)
with the network's output mixed with such an input, `loc, logits = alpha * net + given`:
with alpha = 0 at run time the NMS sees exactly the given input while the network still
runs (a run-time alpha cannot be folded away by the compiler). `Budget` stops a section
when its time is spent, so that a slow device still prints a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.core.box_ops import cxcywh_to_xyxy
from m2det_jax.core.preprocess import preprocess
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.postprocess import make_detect_fn
from m2det_jax.models import apply_inference, build_model

BACKGROUND_LOGIT = 4.0  # softmax ~0.4 for background, each of 80 classes ~0.0075


def _iou_one(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + np.prod(box[2:] - box[:2]) - inter)


def detection_shaped(cfg, batch: int = 1, objects: int = 7,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(loc [B, P, 4] zeros, logits [B, P, C]) of a detector that sees `objects` objects
    per image (random classes, each object the box of a random prior)."""
    priors = cxcywh_to_xyxy(np.asarray(prior_boxes(cfg), np.float64))
    p, c = priors.shape[0], int(cfg.model.num_classes)
    rng = np.random.default_rng(seed)
    logits = np.zeros((batch, p, c), np.float32)
    logits[..., 0] = BACKGROUND_LOGIT
    for b in range(batch):
        for _ in range(objects):
            box = priors[rng.integers(p)]
            overlap = _iou_one(priors, box)
            near = np.flatnonzero(overlap >= 0.35)
            cls = int(rng.integers(1, c))
            # Scores from ~0.2 at the edge of the cluster to ~0.9 at its centre.
            logits[b, near, cls] = np.maximum(logits[b, near, cls],
                                              BACKGROUND_LOGIT + 8.0 * overlap[near] - 2.2)
            if c > 2 and rng.random() < 0.5:  # a confusable class, weaker
                other = 1 + (cls % (c - 1))
                logits[b, near, other] = np.maximum(logits[b, near, other],
                                                    BACKGROUND_LOGIT + 4.0 * overlap[near] - 1.8)
    return np.zeros((batch, p, 4), np.float32), logits


def dense_worst_case(cfg, batch: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(loc [B, P, 4], logits [B, P, C]): every prior scores m = min(C - 1, 1/threshold - 1)
    classes just above the threshold (round-robin over the classes), boxes jittered."""
    p, c = int(prior_boxes(cfg).shape[0]), int(cfg.model.num_classes)
    thr = float(cfg.postprocess.score_threshold)
    m = max(1, min(c - 1, int(np.ceil(1.0 / max(thr, 1e-6))) - 1))
    rng = np.random.default_rng(seed)
    logits = np.full((batch, p, c), -20.0, np.float32)
    rows = np.arange(p)[:, None]
    cols = 1 + (rows * m + np.arange(m)[None, :]) % (c - 1)
    logits[:, rows, cols] = rng.uniform(0.0, 0.01, (batch, p, m)).astype(np.float32)
    loc = rng.normal(0.0, 0.5, (batch, p, 4)).astype(np.float32)
    return loc, logits


def nms_candidates(cfg, logits: np.ndarray) -> float:
    """Mean per image of the (prior, class) pairs the NMS considers: scores above
    `score_threshold`, at most `candidates_per_class` per class (background excluded)."""
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    scores = (e / e.sum(-1, keepdims=True))[..., 1:]
    above = (scores > float(cfg.postprocess.score_threshold)).sum(axis=1)  # [B, C-1]
    cap = int(cfg.postprocess.candidates_per_class)
    if cap > 0:
        above = np.minimum(above, cap)
    return float(above.sum(-1).mean())


def network_fn(cfg) -> Callable:
    """jit((variables, images uint8 [B, S, S, 3]) -> {"loc", "logits"}): the network alone."""
    model = build_model(cfg)
    return jax.jit(lambda v, x: apply_inference(model, v, preprocess(x, cfg)))


def fused_inference_fn(cfg) -> Callable:
    """jit((variables, images, image_sizes, alpha, loc, logits) -> detections): network +
    NMS in one program, the NMS fed alpha * network output + (loc, logits)."""
    model = build_model(cfg)
    priors = jnp.asarray(prior_boxes(cfg))
    detect = make_detect_fn(cfg)

    def run(variables, images, image_sizes, alpha, loc, logits):
        out = apply_inference(model, variables, preprocess(images, cfg))
        mixed_loc = alpha * out["loc"].astype(jnp.float32) + loc
        mixed_logits = alpha * out["logits"].astype(jnp.float32) + logits
        return detect(mixed_loc, mixed_logits, priors, image_sizes)

    return jax.jit(run)


def median_seconds(fn: Callable, args: tuple, iters: int) -> float:
    """Median wall seconds of `fn(*args)` (outputs waited for) over `iters` calls after
    one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(max(int(iters), 1)):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


class Budget:
    """Seconds a section may take: `left()` says whether another measurement may start;
    `skipped` lists what did not."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def left(self, what: str) -> bool:
        if self.spent() < self.seconds:
            return True
        self.skipped.append(what)
        return False
