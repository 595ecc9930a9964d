"""The NMS loops of the plain implementation, on "tasks" in lock step.

One task is one class of one image. A task's candidates lie in a buffer: the stacked
[6, N, kb] array `d` of x1, y1, x2, y2, score and box area (`stack_buffer`), entries in
prior order, the first n[t] of task t valid, the rest padding. Step i of a loop is the
i-th selection of every task at once; a loop stops after `steps` selections (rows never
change after they are selected, so the original's `keep[:keep_per_class]` needs no more)
or once no task has anything left.

* `soft_nms`: the original's C loop (cpu_soft_nms) step by step, in the C loop's
  current array order: take the first maximum of positions i..N-1, swap it to i, decay
  positions i+1..N-1 (linear: score *= 1 - iou if iou > iou_threshold; gaussian:
  score *= exp(-iou^2 / sigma)), replace a decayed box whose score falls below
  `min_score` by the last box (N decreases). Ties among equal scores therefore resolve
  exactly as in the original: the first in the current, permuted order.
* `hard_nms`: greedy NMS (the original's gpu_nms / cpu_nms): highest score first,
  suppress IoU > iou_threshold. The original orders the candidates with numpy's
  `scores.argsort()[::-1]`, a stable ascending sort reversed, so among exactly equal
  scores the later prior comes first; so does this loop.

All float32; the IoU is `core.box_ops.iou`'s formula (the original's C / CUDA float code)
with its products kept out of fused multiply-adds (`arrays.no_contract`), so IoU and
decayed scores are bit-identical to the C loop for identical input boxes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from m2det_jax.inference.postprocess.arrays import (
    IN_BOUNDS,
    cumsum,
    no_contract,
    scatter_rows,
    take,
)
from m2det_jax.inference.postprocess.settings import PostprocessSettings

# Rows of the stacked buffer: [6, N, kb].
X1, Y1, X2, Y2, SCORE, AREA = range(6)


def stack_buffer(cols, pixel_offset: int) -> jnp.ndarray:
    """(x1, y1, x2, y2, score), each [N, kb] -> [6, N, kb] with the box areas appended."""
    x1, y1, x2, y2, score = cols
    off = float(pixel_offset)
    area = no_contract((x2 - x1 + off) * (y2 - y1 + off))
    return jnp.stack([x1, y1, x2, y2, score, area])


def soft_nms(d: jnp.ndarray, n: jnp.ndarray, s: PostprocessSettings, steps: int):
    """The original's cpu_soft_nms on every task, first `steps` selections.

    Args:
      d: [6, N, kb] buffer, entries in prior order; entries >= n are padding.
      n: [N] number of valid entries.
    Returns:
      the buffer after the selections (entries 0..min(steps, N)-1 of a task are its
      selections, in order, with decayed scores) and the final N of every task.
    """
    _, nt, kb = d.shape
    pos = jnp.arange(kb, dtype=jnp.int32)[None, :]  # [1, kb]
    rows = jnp.arange(nt)
    rows_kb = jnp.broadcast_to(rows[:, None], (nt, kb))
    pos_kb = jnp.broadcast_to(pos, (nt, kb))

    def compact(d, bad, n, n_new):
        # The C loop removes a box at `pos` by copying the box at N-1 over it (that box
        # is then examined in its place) and decrementing N. Net effect on positions
        # i+1..N-1, with m of them good: good boxes among the first m positions stay; the
        # k-th bad one of those (left to right) receives the k-th good box counted from
        # the right among positions m..N-1 (the last N - m); the rest is gone.
        left_bad = bad & (pos < n_new[:, None])
        rank_bad = cumsum(left_bad)  # 1-based at bad slots
        right_good = (pos >= n_new[:, None]) & (pos < n[:, None]) & ~bad
        rank_good = cumsum(right_good[:, ::-1])[:, ::-1]
        # fill[t, k] = position of the (k+1)-th good box from the right.
        target = jnp.where(right_good, rows_kb * kb + rank_good - 1, nt * kb)
        fill = scatter_rows(target, pos_kb, nt, kb)
        src = jnp.where(left_bad, take(fill, jnp.maximum(rank_bad - 1, 0), 1), pos)
        return take(d, jnp.broadcast_to(src[None], d.shape), 2)

    def cond(st):
        i, _, n = st
        return (i < steps) & jnp.any(i < n)

    def body(st):
        i, d, n = st
        live = (pos >= i) & (pos < n[:, None])
        # First maximum in the current array order (the C loop's strict `<` scan).
        j = first_max(d[SCORE], live)
        j = jnp.where(i < n, j, i)  # finished tasks: no-op swap
        at_j = take(d, j[None, :, None], 2)  # [6, N, 1]
        at_i = lax.dynamic_slice_in_dim(d, i, 1, axis=2)
        d = d.at[:, rows, j].set(at_i[..., 0], mode=IN_BOUNDS)  # swap
        d = d.at[:, rows, i].set(at_j[..., 0], mode=IN_BOUNDS)
        ov, overlap = iou_with(at_j, d, s.pixel_offset)
        weight = decay(ov, s)
        hit = (pos > i) & (pos < n[:, None]) & overlap  # the C loop's decay pass
        score = jnp.where(hit, weight * d[SCORE], d[SCORE])
        bad = hit & (score < s.min_score)
        n_new = n - jnp.sum(bad, axis=1, dtype=jnp.int32)
        d = d.at[SCORE].set(score)
        d = lax.cond(jnp.any(bad), lambda d: compact(d, bad, n, n_new), lambda d: d, d)
        return i + 1, d, n_new

    _, d, n = lax.while_loop(cond, body, (jnp.int32(0), d, n))
    return d, n


def soft_nms_rows(d: jnp.ndarray, n: jnp.ndarray, s: PostprocessSettings, steps: int):
    """`soft_nms`'s first `steps` selections: rows [6, N, steps] in selection order
    (decayed scores; past the count: whatever the buffer holds), count [N]."""
    d, n = soft_nms(d, n, s, steps)
    return d[:, :, :steps], jnp.minimum(n, steps)


def hard_nms(d: jnp.ndarray, n: jnp.ndarray, s: PostprocessSettings, steps: int):
    """Greedy NMS on every task, first `steps` kept boxes.

    Args:
      d: [6, N, kb] buffer in prior order; n: [N] valid entries.
    Returns:
      keep [N, steps] buffer positions in descending score order (equal scores: the later
      prior first), count [N] how many of them are real.
    """
    _, nt, kb = d.shape
    pos = jnp.arange(kb, dtype=jnp.int32)[None, :]

    def cond(st):
        i, alive, _, _ = st
        return (i < steps) & jnp.any(alive)

    def body(st):
        i, alive, keep, count = st
        j = last_max(d[SCORE], alive)
        has = jnp.any(alive, axis=1)
        ov, _ = iou_with(take(d, j[None, :, None], 2), d, s.pixel_offset)
        alive = alive & ~(ov > s.iou_threshold) & (pos != j[:, None])
        keep = lax.dynamic_update_slice_in_dim(keep, j[:, None], i, axis=1)
        return i + 1, alive, keep, count + has.astype(jnp.int32)

    keep = jnp.zeros((nt, steps), jnp.int32)
    init = (jnp.int32(0), pos < n[:, None], keep, jnp.zeros(nt, jnp.int32))
    _, _, keep, count = lax.while_loop(cond, body, init)
    return keep, count


def iou_with(sel: jnp.ndarray, d: jnp.ndarray, pixel_offset: int):
    """IoU of each task's selected box with all of the task's boxes.

    Args:
      sel: [6, N, 1] the selected entry of every task; d: [6, N, kb] the buffer.
    Returns:
      iou [N, kb] and overlap [N, kb] (the C loop's `iw > 0 and ih > 0` gate: boxes that
      do not overlap are not even decayed).

    w, h = min - max + offset, inter = w * h, iou = inter / (area + area' - inter).
    """
    off = float(pixel_offset)
    iw = jnp.minimum(sel[X2], d[X2]) - jnp.maximum(sel[X1], d[X1]) + off
    ih = jnp.minimum(sel[Y2], d[Y2]) - jnp.maximum(sel[Y1], d[Y1]) + off
    inter = no_contract(jnp.maximum(iw, 0.0) * jnp.maximum(ih, 0.0))
    return inter / (sel[AREA] + d[AREA] - inter), (iw > 0) & (ih > 0)


def decay(ov: jnp.ndarray, s: PostprocessSettings) -> jnp.ndarray:
    """The C loop's soft-NMS weight for IoU `ov` with the selected box."""
    if s.method == "soft_gaussian":
        return jnp.exp(-(ov * ov) / jnp.float32(s.sigma))
    return jnp.where(ov > s.iou_threshold, 1.0 - ov, 1.0)


def first_max(score: jnp.ndarray, live: jnp.ndarray) -> jnp.ndarray:
    """Per task, the first position holding the maximum live score: [N, kb] -> [N].

    A max, then the least position at it (two reductions), faster than `jnp.argmax` on
    XLA:CPU: `python benchmarks/postprocess_kernels.py`, row "first maximum 16 x 1000, 50
    times". A task without a live entry gets some position in 0..kb-1 (callers check
    liveness themselves).
    """
    kb = score.shape[1]
    masked = jnp.where(live, score, -jnp.inf)
    at_max = masked == jnp.max(masked, axis=1)[:, None]
    first = jnp.min(jnp.where(at_max, jnp.arange(kb, dtype=jnp.int32)[None, :], kb), axis=1)
    return jnp.minimum(first, kb - 1)


def last_max(score: jnp.ndarray, live: jnp.ndarray) -> jnp.ndarray:
    """Per task, the last position holding the maximum live score: [N, kb] -> [N] (the
    first of numpy's `argsort()[::-1]` order). Without a live entry: kb - 1."""
    kb = score.shape[1]
    masked = jnp.where(live, score, -jnp.inf)
    at_max = masked == jnp.max(masked, axis=1)[:, None]
    return jnp.max(jnp.where(at_max, jnp.arange(kb, dtype=jnp.int32)[None, :], 0), axis=1)
