"""Speed only: the fast path's per-class work, in the cheapest exact layout for the batch.

`class_rows(scorer, s)` returns `plain.class_rows(scorer, s)`'s rows (tests:
tests/test_inference_postprocess_fast.py). The work of one selection step is B x classes x buffer,
and selecting the candidates is a top-k over the priors for every class. Most images have
candidates in a few priors and a few classes, so besides the plain layout (every class,
every prior, the full `candidates_per_class` buffer) cheaper ones are compiled and the
first that is exact for the batch at hand runs (`lax.switch`); `layout_index` says which.
A layout is (U, tiers): the U priors kept before the per-class work and
((classes, buffer), ...) for the busiest classes first; classes past the last tier must
have no candidate at all.

Each layout with the `python benchmarks/postprocess_kernels.py --part layouts` row that
keeps it ("detect 320 px, <layout>": the set without it vs the full set, on a batch it runs
for; the pre-filter that picks the sparse priors is part of every sparse row; the figures
of one run are in docs/speed.md, "the measurements behind its comments"):
  * sparse (U = `fast_priors`, then `sparse_priors`): only the first U priors that may
    hold a candidate (`scorer.maybe_candidates`), in prior order; needs no image to have
    more such priors. Within them:
      - fast (the smallest U only): only the `fast_classes` busiest classes, a
        `fast_candidates` buffer (needs: every other class has no candidate, none has
        more than that), then the same classes with twice that buffer (the loops' cost
        grows with the buffer: `--part kernels`, row "soft-NMS, 50 selections", 8 x 256
        vs 8 x 128). Rows "fast" and "fast x2";
      - tiered: the `tier_classes` busiest classes of each image get the full buffer,
        the others a `tier_candidates` buffer (needs: every other class has at most that
        many candidates); row "sparse 256 tiered";
      - every class with the full buffer (always exact within U); rows "sparse 256 all"
        (without the 256 group), "sparse 512" (without the 512 group) and "sparse 512
        all";
  * all priors: tiered (row "all priors tiered"), then plain (the fallback, always exact).
The whole fast path against the plain implementation: rows "detect 320 px, typical",
"detect 320 px, crowded" and "detect 320 px, dense, no exact ties".
Few layouts on purpose: every compiled layout costs every call time, run or not
(XLA:CPU's runtime sets up each buffer of the program per call, constants and the scratch
of every reduction and sort included; `--part kernels`, row "cond, branch not taken": a
never-taken branch of 100 sorts vs an empty one), so the rarely useful ones (fast layouts
past the first U, the busiest classes with the full buffer) are not compiled.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from m2det_jax.inference.postprocess.arrays import IN_BOUNDS, take
from m2det_jax.inference.postprocess.settings import PostprocessSettings
from m2det_jax.inference.postprocess.tasks import run_tasks

# (priors U, ((classes, buffer), ...)); see the module docstring.
Layout = tuple[int, tuple[tuple[int, int], ...]]


def class_rows(scorer, s: PostprocessSettings):
    """`plain.class_rows`, fast: rows [B, C-1, L, 5], valid [B, C-1, L], dropped
    [B, C-1]."""
    p, num_cls = scorer.num_priors, scorer.num_classes - 1
    kc = min(s.candidates_per_class, p)
    groups = layout_groups(num_cls, p, kc, s)
    maybe = scorer.maybe_candidates(s.score_threshold) if len(groups) > 1 else None

    def run_group(u):
        pidx, cls_scores, counts, order, sorted_counts = group_inputs(u, scorer, maybe, s)
        boxes = scorer.boxes(pidx)  # only these priors' boxes are computed
        fns = [functools.partial(run_layout, t, s=s) for _, t in groups[u]]
        if len(fns) == 1:
            return fns[0](boxes, cls_scores, counts, order)
        fits = [layout_fits((u, t), sorted_counts, num_cls, kc) for _, t in groups[u]]
        index = jnp.argmax(jnp.stack(fits))  # the first exact layout (the last always is)
        return lax.switch(index, fns, boxes, cls_scores, counts, order)

    us = list(groups)
    if len(us) == 1:
        return run_group(us[0])
    branches = [functools.partial(lambda u, _: run_group(u), u) for u in us]
    return lax.switch(jnp.argmax(group_fits(groups, maybe, p)), branches, None)


def static_layouts(num_cls: int, num_priors: int, kc: int, s: PostprocessSettings) -> list:
    """The layouts compiled for C-1 = num_cls classes, P priors and a buffer of kc,
    cheapest first; the last one (the plain layout) always applies."""
    out: list[Layout] = []
    sparse = sorted({u for u in (s.fast_priors, s.sparse_priors) if 1 <= u < num_priors})
    for u in [*sparse, num_priors]:
        ku = min(kc, u)
        cands = []
        fast_r = min(num_cls, s.fast_classes)
        if sparse and u == sparse[0] and fast_r >= 1:
            fast_k = min(ku, s.fast_candidates)
            if fast_k >= 1:
                cands.append((u, ((fast_r, fast_k),)))
                if 2 * fast_k < ku:  # one busy class is common: a step between the two
                    cands.append((u, ((fast_r, 2 * fast_k),)))
        busy, small = min(num_cls, s.tier_classes), min(ku, s.tier_candidates)
        if 1 <= busy < num_cls and 1 <= small < ku:
            cands.append((u, ((busy, ku), (num_cls - busy, small))))
        cands.append((u, ((num_cls, ku),)))
        for lay in cands:
            if lay not in out:
                out.append(lay)
    return out


def layout_groups(num_cls: int, p: int, kc: int, s: PostprocessSettings) -> dict:
    """`static_layouts` grouped by U, in order: {U: [(flat layout index, tiers), ...]}."""
    groups: dict[int, list] = {}
    for i, (u, tiers) in enumerate(static_layouts(num_cls, p, kc, s)):
        groups.setdefault(u, []).append((i, tiers))
    return groups


def group_fits(groups: dict, maybe, p: int) -> jnp.ndarray:
    """[groups] bool: which groups hold every image's possible-candidate priors."""
    num_maybe = jnp.sum(maybe, axis=1, dtype=jnp.int32)  # [B]
    return jnp.stack([jnp.all(num_maybe <= u) if u < p else jnp.bool_(True) for u in groups])


def group_inputs(u: int, scorer, maybe, s: PostprocessSettings):
    """The per-class work's inputs over a group's U priors (all P when U = P): pidx [B, U]
    (None for all priors), cls_scores [B, C-1, U] (-1 where not a candidate, e.g. padding
    slots), counts [B, C-1] (candidates per class), order [B, C-1] (busiest classes
    first) and sorted_counts [B, C-1] (counts in that order)."""
    pidx = slot_valid = None
    if u < scorer.num_priors:
        pidx, slot_valid = first_priors(maybe, u)  # [B, u]
    scores = scorer.scores(pidx)[:, :, 1:]  # [B, U, C-1]
    above = scores > s.score_threshold  # float32 compare, as the original
    if slot_valid is not None:  # padding slots are never candidates
        above = above & slot_valid[:, :, None]
    # Only candidates keep their score: the rest is -1, which also makes XLA:CPU's top_k
    # several times faster (ties at -1 are rejected at once).
    scores = jnp.where(above, scores, -1.0)
    counts = jnp.sum(above, axis=1, dtype=jnp.int32)  # [B, C-1]
    order = jnp.argsort(-counts, axis=1, stable=True)
    sorted_counts = take(counts, order, 1)
    return pidx, jnp.swapaxes(scores, 1, 2), counts, order, sorted_counts


def first_priors(mask: jnp.ndarray, u: int):
    """The first `u` priors where mask is True, in prior order: idx [B, u], valid [B, u].

    top_k of a key that decreases with the prior index (XLA:CPU's top_k is several times
    faster than a cumsum + scatter compaction here, timed ad hoc); slots past the count
    are padding (prior 0's index, never a candidate).
    """
    p = mask.shape[1]
    key = jnp.where(mask, (p - jnp.arange(p)).astype(jnp.float32), 0.0)
    _, idx = lax.top_k(key, u)  # [B, u]
    valid = jnp.arange(u)[None, :] < jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None]
    return idx, valid


def layout_fits(layout: Layout, sorted_counts: jnp.ndarray, num_cls: int, kc: int):
    """Whether `layout` is exact for every image, given candidate counts per class sorted
    busiest first ([B, C-1]) over the layout's U priors."""
    u, tiers = layout
    ok = jnp.bool_(True)
    start = 0
    for r, kb in tiers:
        if kb < min(kc, u):  # a buffer that could truncate where the plain one doesn't
            ok = ok & jnp.all(sorted_counts[:, start] <= kb)
        start += r
    if start < num_cls:  # classes left out must have nothing to do
        ok = ok & jnp.all(sorted_counts[:, start] == 0)
    return ok


def run_layout(tiers, boxes, cls_scores, counts, order, s: PostprocessSettings):
    """NMS of the busiest classes per `tiers` on [B, U] priors -> class-ordered
    rows [B, C-1, L, 5], valid [B, C-1, L], dropped [B, C-1]."""
    b, num_cls, _ = cls_scores.shape
    if len(tiers) == 1 and tiers[0][0] == num_cls:  # every class, in class order
        return run_tasks(boxes, cls_scores, counts, None, s, tiers[0][1])
    outs, start = [], 0
    for r, kb in tiers:
        outs.append(run_tasks(boxes, cls_scores, counts, order[:, start : start + r], s, kb))
        start += r
    rows, valid, dropped = (jnp.concatenate(x, axis=1) for x in zip(*outs, strict=True))
    # Busiest-first back to class order; classes without a task produce nothing.
    steps = s.keep_per_class
    bi = jnp.arange(b)[:, None]
    cls = order[:, :start]
    return (
        jnp.zeros((b, num_cls, steps, 5), rows.dtype).at[bi, cls].set(rows, mode=IN_BOUNDS),
        jnp.zeros((b, num_cls, steps), bool).at[bi, cls].set(valid, mode=IN_BOUNDS),
        jnp.zeros((b, num_cls), dropped.dtype).at[bi, cls].set(dropped, mode=IN_BOUNDS),
    )


def layout_index(scorer, s: PostprocessSettings) -> int:
    """Which of `static_layouts` `class_rows` runs for this scorer's batch: its index.

    For tests and benchmarks (not jitted); the same helpers as `class_rows`'s own choice.
    """
    p, num_cls = scorer.num_priors, scorer.num_classes - 1
    if not s.fast:
        return len(static_layouts(num_cls, p, min(s.candidates_per_class, p), s)) - 1
    kc = min(s.candidates_per_class, p)
    groups = layout_groups(num_cls, p, kc, s)
    maybe = scorer.maybe_candidates(s.score_threshold)
    u = list(groups)[int(jnp.argmax(group_fits(groups, maybe, p)))]
    *_, sorted_counts = group_inputs(u, scorer, maybe, s)
    for i, tiers in groups[u]:
        if bool(layout_fits((u, tiers), sorted_counts, num_cls, kc)):
            return i
    raise AssertionError("the last layout of a group always fits")  # pragma: no cover
