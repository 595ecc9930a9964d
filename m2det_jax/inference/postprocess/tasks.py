"""Speed only: the per-class work of the fast path, for a chosen subset of classes.

`run_tasks` is `plain.class_rows`'s work (candidates in prior order, NMS, rows) for R
classes per image with a buffer of kb candidates, where R and kb come from a layout
(`postprocess.layouts`). Two things differ from the plain code, both for speed only and
both giving the same rows (tests/test_inference_postprocess_fast.py):
* the candidates go back to prior order through one sort of a packed int32 key
  (faster than a (key, value) sort on XLA:CPU: `python benchmarks/postprocess_kernels.py`,
  row "sort 80 x 1000 by prior");
* soft-NMS runs `untied.soft_nms_rows` (the untied loop first; its rows in untied.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from m2det_jax.inference.postprocess.arrays import take
from m2det_jax.inference.postprocess.plain import task_rows
from m2det_jax.inference.postprocess.settings import PostprocessSettings
from m2det_jax.inference.postprocess.untied import soft_nms_rows


def run_tasks(boxes, cls_scores, counts, task_cls, s: PostprocessSettings, kb: int):
    """NMS for R classes per image.

    Args:
      boxes: [B, U, 4] and cls_scores: [B, C-1, U] (-1 where not a candidate), over U
        priors in prior order.
      counts: [B, C-1] candidates per class.
      task_cls: [B, R] class slots (0-based) to process; None: every class in order.
      kb: candidate buffer size.
    Returns:
      rows [B, R, L, 5], valid [B, R, L], dropped [B, R].
    """
    b = cls_scores.shape[0]
    idx, sc, n, dropped = select_candidates(cls_scores, counts, kb, task_cls)  # [B*R, kb]
    rows, valid = task_rows(boxes, idx, sc, n, s, soft_nms_rows)
    r = idx.shape[0] // b
    steps = s.keep_per_class
    return rows.reshape(b, r, steps, 5), valid.reshape(b, r, steps), dropped.reshape(b, r)


def select_candidates(score_t: jnp.ndarray, count: jnp.ndarray, kb: int, rows=None):
    """`plain.candidates` of some rows of score_t, plus how many were dropped.

    Args:
      score_t: [B, T, U] scores over U priors (T: classes), -1 where not a candidate.
      count: [B, T] candidates per row.
      kb: candidate buffer size (<= U).
      rows: [B, R] rows of score_t to take (the tasks), or None for all of them.
    Returns:
      idx [B*R, kb] prior indices (valid ones first, ascending = prior order; padding U),
      their scores [B*R, kb], n [B*R] valid entries, dropped [B*R] candidates beyond kb.

    For most rows of a big score_t, top_k of all of it beats copying the rows out first
    (at 512 px the 64 lower-tier rows are 64 x 32,760 priors x 4 B = 8 MiB to copy); for
    at most half of them the copy comes first.
    """
    b, t, u = score_t.shape
    if rows is not None and 2 * rows.shape[1] <= t:
        score_t = take(score_t, rows[:, :, None], 1)  # [B, R, U]
        count = take(count, rows, 1)
        rows = None
    vals, top_idx = lax.top_k(score_t, kb)  # [B, T, kb]
    if rows is not None:
        vals = take(vals, rows[:, :, None], 1)
        top_idx = take(top_idx, rows[:, :, None], 1)
        count = take(count, rows, 1)
    vals, top_idx = vals.reshape(-1, kb), top_idx.reshape(-1, kb)
    count = count.reshape(-1)
    n = jnp.minimum(count, kb)
    slot_valid = jnp.arange(kb) < n[:, None]
    idx = jnp.where(slot_valid, top_idx, u)
    if (u + 1) * kb < 2**31:
        # Sort (prior, slot) packed in one int32: XLA:CPU sorts one operand faster than a
        # (key, value) pair (benchmarks/postprocess_kernels.py, "sort 80 x 1000 by prior").
        key = jnp.sort(idx * kb + jnp.arange(kb, dtype=idx.dtype), axis=1)
        idx, vals = key // kb, take(vals, key % kb, 1)
    else:  # pragma: no cover (more than 2**31 / kb priors)
        idx, vals = lax.sort((idx, vals), dimension=1, num_keys=1)
    return idx, vals, n, count - n
