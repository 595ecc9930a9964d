"""Speed only: a soft-NMS loop that never moves entries, exact unless a maximum is tied.

`soft_nms_rows` gives `loops.soft_nms_rows`'s rows bit for bit (tests:
tests/test_inference_postprocess_fast.py): the untied loop runs first, and the C-order loop
(`loops.soft_nms`) redoes the batch only if some step of some task had a tied maximum.
Justified by `python benchmarks/postprocess_kernels.py`, row "soft-NMS 16 x 1000, 50
selections" (C-order loop vs untied loop), and at the detect level row "detect 320 px,
dense, no exact ties" (plain implementation vs fast path). On a batch with a tie both
loops run, and row "detect 320 px, plain layout, dense" shows no loss either (figures:
docs/speed.md).

Why it is exact: where every step's maximum score is unique, the C loop's array order
never matters. Each entry's score goes through the same decays whatever its position, and
the step takes the one maximum. So entries stay where they are, a dead one (selected or
removed) gets score -inf, and each step is a first maximum that also counts ties (`top1`),
a gather of the selected box and one elementwise pass over the scores (no swap, no
compaction). The loop carries one [N, kb] array; what was selected is recorded in
[N, steps] columns.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from m2det_jax.inference.postprocess.arrays import take
from m2det_jax.inference.postprocess.loops import SCORE, decay, iou_with, soft_nms
from m2det_jax.inference.postprocess.settings import PostprocessSettings


def soft_nms_rows(d: jnp.ndarray, n: jnp.ndarray, s: PostprocessSettings, steps: int):
    """The first `steps` selections of the original's soft-NMS: rows [6, N, steps] in
    selection order (decayed scores), count [N]; as `loops.soft_nms_rows`.

    `soft_nms_untied` first; only if some task had a tied maximum, `loops.soft_nms` (the
    C loop's array order, exact on ties) redoes the batch.
    """
    nt = d.shape[1]
    sel, sel_score, count, tied = soft_nms_untied(d, n, s, steps)
    rows = take(d, jnp.broadcast_to(sel[None], (6, nt, steps)), 2).at[SCORE].set(sel_score)

    # The exact loop runs no step unless a maximum was tied (n = 0 stops it at once; a
    # lax.cond costs more here than the empty loop).
    redo = jnp.any(tied)
    d_exact, n_exact = soft_nms(d, jnp.where(redo, n, 0), s, steps)
    rows = jnp.where(redo, d_exact[:, :, :steps], rows)
    return rows, jnp.where(redo, jnp.minimum(n_exact, steps), count)


def soft_nms_untied(d: jnp.ndarray, n: jnp.ndarray, s: PostprocessSettings, steps: int):
    """`loops.soft_nms` without moving entries, exact unless the maximum is tied at some
    step.

    Args as `loops.soft_nms`. Returns:
      sel [N, steps] the buffer position selected at each step (valid for the first
        `count` steps), sel_score [N, steps] its score when it was selected (-inf past
        `count`),
      count [N] selections made (at most `steps`),
      tied [N] a step of that task had two live entries at the maximum score; its rows
        are then not trusted (`soft_nms_rows` redoes them).
    """
    _, nt, kb = d.shape
    pos = jnp.arange(kb, dtype=jnp.int32)[None, :]
    score0 = jnp.where(pos < n[:, None], d[SCORE], -jnp.inf)

    def cond(st):
        i, *_, busy = st
        return (i < steps) & busy

    def body(st):
        i, score, sel, sel_score, tied, _ = st
        best, j, n_best = top1(score)  # the maximum, first position, how many hold it
        live = best > -jnp.inf
        tied = tied | (live & (n_best > 1))
        j = j[:, None]
        chosen = pos == j
        at_j = take(d, j[None], 2)  # [6, N, 1]
        ov, overlap = iou_with(at_j, d, s.pixel_offset)
        decayed = jnp.where(overlap, decay(ov, s) * score, score)
        # Killed by this decay (the C loop's removal). `~(x >= floor)` also kills a dead
        # entry that became NaN (-inf * 0, linear decay at IoU 1) and keeps -inf dead.
        decayed = jnp.where(overlap & ~(decayed >= s.min_score), -jnp.inf, decayed)
        score = jnp.where(chosen, -jnp.inf, decayed)
        sel = lax.dynamic_update_slice_in_dim(sel, j, i, axis=1)
        sel_score = lax.dynamic_update_slice_in_dim(sel_score, best[:, None], i, axis=1)
        return i + 1, score, sel, sel_score, tied, jnp.any(live)

    init = (jnp.int32(0), score0, jnp.zeros((nt, steps), jnp.int32),
            jnp.full((nt, steps), -jnp.inf, d.dtype), jnp.zeros(nt, bool),
            jnp.any(n > 0))  # fmt: skip
    _, _, sel, sel_score, tied, _ = lax.while_loop(cond, body, init)
    # A task's steps select live entries until its first step without one (-inf).
    count = jnp.sum(sel_score > -jnp.inf, axis=1, dtype=jnp.int32)
    return sel, sel_score, count, tied


def top1(score: jnp.ndarray):
    """Per row of [N, kb]: the maximum [N], the first position holding it [N] (int32) and
    how many positions hold it [N] (int32).

    `loops.first_max`'s two reductions plus a count of the maximum (no sort), far cheaper
    on XLA:CPU than `lax.top_k` of 2 (which would show a tie): `python
    benchmarks/postprocess_kernels.py`, row "first maximum + ties, 50 times".
    """
    kb = score.shape[1]
    best = jnp.max(score, axis=1)
    at_max = score == best[:, None]
    pos = jnp.arange(kb, dtype=jnp.int32)[None, :]
    first = jnp.min(jnp.where(at_max, pos, kb), axis=1)
    return best, jnp.minimum(first, kb - 1), jnp.sum(at_max, axis=1, dtype=jnp.int32)
