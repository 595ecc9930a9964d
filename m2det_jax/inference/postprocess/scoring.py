"""Where the per-class work reads its boxes and class scores: a "scorer".

`detect` starts from the network's output (loc, logits) and the priors: boxes are
decoded and scores soft-maxed here (`LogitScorer`). `nms` starts from boxes that are
already decoded and from class probabilities (`ProbabilityScorer`). Both give the NMS
the same things, so one implementation serves both:

* `boxes(pidx)` / `scores(pidx)`: xyxy boxes [B, U, 4] (pixels of `image_sizes` when given,
  normalized otherwise; never clipped) and class probabilities [B, U, C] of the priors
  `pidx` [B, U], or of all priors (pidx None; what the plain implementation reads);
* `maybe_candidates(threshold)` (speed only, for the sparse layouts): [B, P] bool, a
  superset of the priors with some foreground score > threshold. From probabilities it
  is exact; from logits it is decided without exp (see `LogitScorer.maybe_candidates`).

A gathered probability is the probability itself, and a prior's box is computed by the
same float32 operations whatever the program (`core.box_ops.decode` and `core.box_ops.scale_xyxy`
keep their products out of fused multiply-adds). What XLA can still round differently
between programs (the package docstring): the softmax of gathered logits vs all of them
(class sums in another order), and, for more than one image, the decode of priors
broadcast over the batch vs gathered per image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.core import box_ops
from m2det_jax.inference.postprocess.arrays import IN_BOUNDS, take


def decode_and_score(loc, logits, priors, image_sizes, variance):
    """The original's `Detect` for a batch: boxes [B, P, 4] xyxy, scores [B, P, C]."""
    logits = logits.astype(jnp.float32)
    scores = softmax_rows(logits, *softmax_parts(logits))
    return decode_boxes(loc, priors, image_sizes, variance), scores


@functools.cache
def jitted_decode_and_score(variance):
    return jax.jit(functools.partial(decode_and_score, variance=variance))


class LogitScorer:
    """`detect`'s input: loc [B, P, 4], logits [B, P, C] float32, priors [P, 4] (cx, cy,
    w, h), image_sizes [B, 2] (height, width) or None. Only the priors asked for are
    decoded and soft-maxed."""

    def __init__(self, loc, logits, priors, image_sizes, variance):
        self.loc, self.logits, self.priors = loc, logits, priors
        self.image_sizes, self.variance = image_sizes, variance

    @property
    def num_priors(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    def boxes(self, pidx=None):
        if pidx is None:
            return decode_boxes(self.loc, self.priors, self.image_sizes, self.variance)
        pr = jnp.asarray(self.priors).at[pidx].get(mode=IN_BOUNDS)
        loc = take(self.loc, pidx[:, :, None], 1)
        return decode_boxes(loc, pr, self.image_sizes, self.variance)

    def scores(self, pidx=None):
        logits = self.logits if pidx is None else take(self.logits, pidx[:, :, None], 1)
        return softmax_rows(logits, *softmax_parts(logits))

    def maybe_candidates(self, score_threshold: float) -> jnp.ndarray:
        """Speed only: [B, P] bool, a superset of the priors with a candidate, without exp
        (it picks the sparse layouts' priors; their benchmark rows are in layouts.py).

        A score is exp(l - max) / sum with sum >= 1, so score > t needs exp(l - max) > t,
        i.e. l - max > log t, hence l - l0 > log t (max >= l0, and float subtraction is
        monotone). Class 0 itself always passes (0 > log t), so a prior may hold a
        candidate iff another class passes too. The margin (1e-3 in log space) covers the
        rounding of exp by orders of magnitude; the exact test is redone on the priors
        kept.
        """
        logits = self.logits
        if score_threshold <= 0:
            return jnp.ones(logits.shape[:2], bool)
        if score_threshold >= 1:
            return jnp.zeros(logits.shape[:2], bool)
        thr = np.float32(np.log(score_threshold) - 1e-3)
        return foreground_any((logits - logits[..., :1]) > thr)


class ProbabilityScorer:
    """`nms`'s input: boxes [B, P, 4] decoded normalized xyxy, scores [B, P, C] class
    probabilities (float32), image_sizes [B, 2] (height, width) or None. Only the boxes
    asked for are scaled to pixels."""

    def __init__(self, boxes, scores, image_sizes):
        self.boxes_in, self.probs, self.image_sizes = boxes, scores, image_sizes

    @property
    def num_priors(self) -> int:
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]

    def boxes(self, pidx=None):
        boxes = self.boxes_in if pidx is None else take(self.boxes_in, pidx[:, :, None], 1)
        if self.image_sizes is not None:
            boxes = box_ops.scale_xyxy(boxes, self.image_sizes)
        return boxes

    def scores(self, pidx=None):
        return self.probs if pidx is None else take(self.probs, pidx[:, :, None], 1)

    def maybe_candidates(self, score_threshold: float) -> jnp.ndarray:
        """Speed only: [B, P] bool, exactly the priors with a candidate."""
        return foreground_any(self.probs > score_threshold)


def decode_boxes(loc, priors, image_sizes, variance):
    """[B, U, 4] regressions, [U, 4] or [B, U, 4] priors, [B, 2] | None -> xyxy [B, U, 4]
    (pixels of image_sizes or normalized), products kept out of fused multiply-adds."""
    boxes = box_ops.decode(loc.astype(jnp.float32), priors.astype(jnp.float32), variance)
    if image_sizes is not None:
        boxes = box_ops.scale_xyxy(boxes, image_sizes)
    return boxes


def softmax_parts(logits: jnp.ndarray):
    """Row max and row sum of exp of the softmax over classes: [B, P, C] -> 2 x [B, P, 1].

    `softmax_rows` then gives jax.nn.softmax's formula (exp(x - max) / sum).
    """
    m = jnp.max(logits, axis=-1, keepdims=True)
    return m, jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)


def softmax_rows(logits, m, total):
    return jnp.exp(logits - m) / total


def foreground_any(passes: jnp.ndarray) -> jnp.ndarray:
    """[B, P, C] bool -> [B, P]: whether some class c >= 1 passes.

    An int8 max: XLA:CPU splits this row reduction and materializes its input, and one
    byte per logit is 4x less than a count's int32 (an int8 max also ran faster than a
    bool `any` here, timed ad hoc; no benchmark row).
    """
    foreground = jnp.arange(passes.shape[-1]) >= 1
    return jnp.max((foreground & passes).astype(jnp.int8), axis=-1) > 0
