"""Class-agnostic NMS and the class filter: the two run-time choices beyond the original.

* `class_rows` (`postprocess.class_agnostic = True`): one NMS per image over all classes.
  Every prior competes once, with its best foreground class (the highest probability
  among classes 1..C-1; on equal probabilities the lower class id) if that probability is
  strictly above `score_threshold`. At most `candidates_per_class` of them (the highest;
  the cap now applies per image) go, in prior order, through the same loops as the
  per-class NMS (`loops.soft_nms` in the C loop's order, or greedy `loops.hard_nms`), so
  one box can no longer hold two classes and an object seen as two classes keeps one.
  The rows carry their class through the loop. Up to L = `max_per_image` rows (or
  `keep_per_class` when `max_per_image` is 0) are kept in selection order, which is
  descending (decayed) score: a selection is the highest remaining score and scores
  only decay. This is the same as per-class NMS on a single "class" holding every
  prior's best score, then labelling each row with its prior's class (the test).
* `ClassFilter`: `postprocess.classes` (ids 1..C-1; empty = all) zeroes the other
  classes' probabilities before NMS, so they never become candidates, never suppress
  anything in the class-agnostic NMS, and never take a place under `max_per_image`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2det_jax.inference.postprocess.arrays import IN_BOUNDS, take
from m2det_jax.inference.postprocess.loops import SCORE, hard_nms, soft_nms_rows, stack_buffer
from m2det_jax.inference.postprocess.plain import candidates
from m2det_jax.inference.postprocess.settings import PostprocessSettings


def num_rows(s: PostprocessSettings) -> int:
    """Rows per image of the class-agnostic output."""
    return s.max_per_image if s.max_per_image > 0 else s.keep_per_class


def class_rows(scorer, s: PostprocessSettings) -> dict:
    """The class-agnostic NMS of a batch: `detect` / `nms`'s output dict with K = `num_rows(s)`
    rows per image in selection order (padding rows: valid False, zeros, class 1);
    "num_dropped" [B, C] counts, per best class, the candidates beyond the per-image cap;
    "num_tie_dropped" is 0 (the rows are already the highest ones)."""
    boxes, scores = scorer.boxes(), scorer.scores()  # [B, P, 4], [B, P, C]
    b, p, c = scores.shape
    fg = scores[:, :, 1:]
    best = jnp.max(fg, axis=2)  # [B, P]
    cls = (jnp.argmax(fg, axis=2) + 1).astype(jnp.int32)  # first maximum: lower class id
    above = best > s.score_threshold  # float32 compare, as the per-class path
    counts = jnp.sum(above, axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
    kb = min(s.candidates_per_class, p)
    idx, sc, n = candidates(jnp.where(above, best, -1.0)[:, None, :], counts, kb)  # [B, kb]
    safe = jnp.minimum(idx, p - 1)
    bx = take(boxes, safe[:, :, None], 1)  # [B, kb, 4]
    label = take(cls, safe, 1).astype(jnp.float32)  # carried through the loop as a row
    d = stack_buffer((bx[..., 0], bx[..., 1], bx[..., 2], bx[..., 3], sc), s.pixel_offset)
    d = jnp.concatenate([d, label[None]], axis=0)  # [7, B, kb]
    steps = num_rows(s)
    if s.method == "hard":
        keep, count = hard_nms(d, n, s, steps)
        d = take(d, jnp.broadcast_to(keep[None], (d.shape[0],) + keep.shape), 2)
    else:
        d, count = soft_nms_rows(d, n, s, min(steps, kb))
        if d.shape[2] < steps:
            d = jnp.pad(d, ((0, 0), (0, 0), (0, steps - d.shape[2])))
    valid = jnp.arange(steps)[None, :] < count[:, None]  # [B, L]
    rows = jnp.where(valid[None], d, 0.0)
    in_buffer = jnp.zeros((b, p + 1), bool).at[jnp.arange(b)[:, None], idx].set(True)[:, :p]
    late = above & ~in_buffer  # candidates the per-image cap dropped
    dropped = jnp.sum(jax.nn.one_hot(cls, c, dtype=jnp.int32) * late[..., None], axis=1,
                      dtype=jnp.int32)  # fmt: skip
    return {
        "boxes": jnp.moveaxis(rows[:4], 0, -1),
        "scores": rows[SCORE],
        "classes": jnp.where(valid, d[-1].astype(jnp.int32), 1),
        "valid": valid,
        "num_dropped": dropped,
        "num_tie_dropped": jnp.zeros(b, jnp.int32),
    }


class ClassFilter:
    """A scorer whose probabilities of classes outside `classes` are 0 (see the module
    docstring); everything else is the wrapped scorer's."""

    def __init__(self, scorer, classes: tuple[int, ...]):
        self.inner = scorer
        keep = jnp.zeros(scorer.num_classes, jnp.float32).at[0].set(1.0)
        self.mask = keep.at[jnp.asarray(classes, jnp.int32)].set(1.0, mode=IN_BOUNDS)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def scores(self, pidx=None):
        return self.inner.scores(pidx) * self.mask
