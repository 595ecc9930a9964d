"""The plain implementation: the specification the fast path is tested against.

`class_rows` does the per-class work of a batch as the algorithm states it (all classes,
all priors, the C-order soft-NMS loop or greedy hard NMS), and `finish` applies the
per-image cap and lays the rows out as `detect` / `nms` return them. Run it alone with
`PostprocessSettings(..., fast=False)`; the fast path (`postprocess.layouts`) reuses
`task_rows` and `finish` and gives the same output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from m2det_jax.inference.postprocess.arrays import IN_BOUNDS, cumsum, take
from m2det_jax.inference.postprocess.loops import SCORE, hard_nms, soft_nms_rows, stack_buffer
from m2det_jax.inference.postprocess.settings import PostprocessSettings


def class_rows(scorer, s: PostprocessSettings):
    """Per-class NMS of a batch, every class over every prior.

    Args:
      scorer: a `postprocess.scoring` scorer (B images, P priors, C classes).
    Returns:
      rows [B, C-1, L, 5] (x1, y1, x2, y2, score; L = keep_per_class; row j of class c
      is its j-th selection, zeros past the count), valid [B, C-1, L], dropped [B, C-1]
      (candidates beyond candidates_per_class).
    """
    boxes, scores = scorer.boxes(), scorer.scores()  # [B, P, 4], [B, P, C]
    b, p, c = scores.shape
    kc = min(s.candidates_per_class, p)
    cls_scores = jnp.swapaxes(scores[:, :, 1:], 1, 2)  # [B, C-1, P]
    above = cls_scores > s.score_threshold  # float32 compare, as the original
    counts = jnp.sum(above, axis=2, dtype=jnp.int32)  # [B, C-1]
    idx, sc, n = candidates(jnp.where(above, cls_scores, -1.0), counts, kc)
    rows, valid = task_rows(boxes, idx, sc, n, s, soft_nms_rows)
    steps = s.keep_per_class
    return (
        rows.reshape(b, c - 1, steps, 5),
        valid.reshape(b, c - 1, steps),
        (counts - n.reshape(b, c - 1)),
    )


def candidates(cls_scores: jnp.ndarray, counts: jnp.ndarray, kb: int):
    """Each task's candidates in prior order.

    Args:
      cls_scores: [B, T, U] scores over U priors of T tasks per image, -1 where not a
        candidate (score not above the threshold).
      counts: [B, T] candidates per task.
      kb: candidate buffer size (<= U).
    Returns:
      idx [B*T, kb] prior indices (valid ones first, ascending; padding U), their scores
      [B*T, kb], n [B*T] valid entries.

    The highest kb scores (lax.top_k puts the lower index first on equal values) go back
    to prior order, so the buffer holds what the original's `dets` would hold (all of
    them when a class has at most kb candidates).
    """
    u = cls_scores.shape[2]
    vals, idx = lax.top_k(cls_scores, kb)  # [B, T, kb]
    vals, idx = vals.reshape(-1, kb), idx.reshape(-1, kb)
    n = jnp.minimum(counts.reshape(-1), kb)
    idx = jnp.where(jnp.arange(kb) < n[:, None], idx, u)
    idx, vals = lax.sort((idx, vals), dimension=1, num_keys=1)
    return idx, vals, n


def task_rows(boxes, idx, sc, n, s: PostprocessSettings, soft_rows):
    """NMS of tasks: the rows they select.

    Args:
      boxes: [B, U, 4] boxes of U priors; idx, sc: [B*R, kb] each task's candidates
        (prior indices into U in prior order, their scores; R tasks per image,
        batch-major), n: [B*R] valid entries.
      soft_rows: the soft-NMS loop, (d, n, s, steps) -> (rows [6, N, steps], count [N])
        (`loops.soft_nms_rows`, or the fast path's equal one).
    Returns:
      rows [B*R, L, 5] in selection order (zeros past the count), valid [B*R, L].
    """
    steps = s.keep_per_class
    b, nt, kb = boxes.shape[0], idx.shape[0], idx.shape[1]
    img = jnp.repeat(jnp.arange(b), nt // b)
    bx = boxes.at[img[:, None], jnp.minimum(idx, boxes.shape[1] - 1)].get(mode=IN_BOUNDS)
    d = stack_buffer((bx[..., 0], bx[..., 1], bx[..., 2], bx[..., 3], sc), s.pixel_offset)
    if s.method == "hard":
        keep, count = hard_nms(d, n, s, steps)
        d = take(d, jnp.broadcast_to(keep[None], (6,) + keep.shape), 2)
    else:
        d, count = soft_rows(d, n, s, min(steps, kb))
        if d.shape[2] < steps:
            d = jnp.pad(d, ((0, 0), (0, 0), (0, steps - d.shape[2])))
    rows = jnp.moveaxis(d[: SCORE + 1], 0, -1)  # [B*R, L, 5]
    valid = jnp.arange(steps)[None, :] < count[:, None]
    return jnp.where(valid[..., None], rows, 0.0), valid


def finish(rows, valid, dropped, s: PostprocessSettings) -> dict:
    """Per-class rows [B, C-1, L, 5], valid [B, C-1, L], dropped [B, C-1] -> the output
    dict of `detect` / `nms` (flattened class-major, capped per image)."""
    b, num_cls, steps, _ = rows.shape
    classes = jnp.broadcast_to(
        jnp.arange(1, num_cls + 1, dtype=jnp.int32)[None, :, None], (b, num_cls, steps)
    )
    rows = rows.reshape(b, num_cls * steps, 5)
    valid = valid.reshape(b, num_cls * steps)
    classes = classes.reshape(b, num_cls * steps)
    tie_dropped = jnp.zeros(b, jnp.int32)
    if s.max_per_image > 0:
        order, valid, tie_dropped = jax.vmap(lambda sc, v: per_image_cap(sc, v, s.max_per_image))(
            rows[..., 4], valid
        )
        rows = take(rows, order[..., None], 1)
        classes = jnp.where(valid, take(classes, order, 1), 1)
        rows = jnp.where(valid[..., None], rows, 0.0)
    return {
        "boxes": rows[..., :4],
        "scores": rows[..., 4],
        "classes": classes,
        "valid": valid,
        "num_dropped": jnp.concatenate([jnp.zeros((b, 1), jnp.int32), dropped], axis=1),
        "num_tie_dropped": tie_dropped,
    }


def per_image_cap(scores, valid, max_per_image: int):
    """The original's max_per_image rule on one image's flattened rows.

    Args:
      scores, valid: [R] rows in class-major / selection order.
    Returns:
      order [K] row indices to output (kept rows first, in row order), keep [K] bool,
      tie_dropped (rows the `>=` rule keeps that do not fit in K).
    """
    r = scores.shape[0]
    k = min(max_per_image, r)
    total = jnp.sum(valid, dtype=jnp.int32)
    masked = jnp.where(valid, scores, -jnp.inf)
    # The k-th largest score as the min of the top k (the same value): taking the last
    # element instead makes XLA:CPU replace its TopK kernel by a full sort, which made the
    # cap slower (timed ad hoc; no benchmark row).
    thresh = jnp.min(lax.top_k(masked, k)[0])
    capped = total > max_per_image
    n_above = jnp.sum(valid & (scores > thresh), dtype=jnp.int32)
    tied = valid & (scores == thresh)
    tie_rank = cumsum(tied[None])[0]
    keep_capped = valid & ((scores > thresh) | (tied & (tie_rank <= k - n_above)))
    keep = jnp.where(capped, keep_capped, valid)
    tie_dropped = jnp.where(capped, jnp.sum(tied, dtype=jnp.int32) - (k - n_above), 0)
    # Kept rows first, in row order: top_k of a key decreasing with the row index (several
    # times faster than a stable argsort on XLA:CPU); at most k rows are kept.
    key = jnp.where(keep, (r - jnp.arange(r)).astype(jnp.float32), 0.0)
    order = lax.top_k(key, k)[1]
    return order, keep.at[order].get(mode=IN_BOUNDS), tie_dropped
