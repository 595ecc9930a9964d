"""The speed-only pieces equal the plain implementation (`PostprocessSettings(fast=False)`):
the untied soft-NMS loop and `top1`, the fast candidate selection, the pre-filters and
every layout, bit for bit on many random batches through `nms` (probabilities are gathered
as they are), and through `detect` up to the last bit of a gathered softmax.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax.inference import postprocess as pp
from m2det_jax.inference.postprocess import layouts, loops, plain, scoring, tasks, untied
from tests.postprocess_reference import F32, clustered_case, make_cfg

KEYS = ("boxes", "scores", "classes", "valid", "num_dropped", "num_tie_dropped")


def small_layouts(cfg, **kw):
    """Settings with small layouts, so that every layout runs on a 600-prior problem."""
    base = pp.PostprocessSettings.from_config(cfg)
    return dataclasses.replace(base, fast_priors=100, fast_classes=2, fast_candidates=30,
                               tier_classes=3, tier_candidates=40, sparse_priors=200, **kw)  # fmt: skip


def buffer_case(rng, nt, kb, tied_tasks=()):
    xy = rng.uniform(0, 60, (nt, kb, 2)).astype(F32)
    wh = rng.uniform(8, 40, (nt, kb, 2)).astype(F32)
    score = rng.uniform(0.1, 1.0, (nt, kb)).astype(F32)
    for t in tied_tasks:  # two live entries at the top score
        score[t, 3] = score[t, 7] = F32(1.5)
    cols = (xy[..., 0], xy[..., 1], (xy + wh)[..., 0], (xy + wh)[..., 1], score)
    return loops.stack_buffer(tuple(jnp.asarray(c) for c in cols), 1)


def jit_loop(fn):
    return jax.jit(fn, static_argnums=(2, 3))


def test_untied_loop_equals_the_c_order_loop_and_flags_ties():
    """`untied.soft_nms_untied` (entries never move) gives the C-order loop's rows, bit for
    bit, on random buffers with decays and removals; it flags a task exactly when a step's
    maximum was tied, and `untied.soft_nms_rows` then returns the C-order rows."""
    nt, kb, steps = 6, 40, 25
    n = np.array([40, 33, 1, 0, 17, 40], np.int32)
    for method in ("soft_linear", "soft_gaussian"):
        s = pp.PostprocessSettings(method=method, min_score=0.05)
        for tied_tasks in ((), (1, 4)):
            d = buffer_case(np.random.default_rng(11), nt, kb, tied_tasks)
            d_c, n_c = map(np.asarray, jit_loop(loops.soft_nms)(d, n, s, steps))
            sel, sel_score, count_u, tied = map(
                np.asarray, jit_loop(untied.soft_nms_untied)(d, n, s, steps)
            )
            np.testing.assert_array_equal(np.flatnonzero(tied), tied_tasks)
            rows, count = map(np.asarray, jit_loop(untied.soft_nms_rows)(d, n, s, steps))
            rows_p, count_p = map(np.asarray, jit_loop(loops.soft_nms_rows)(d, n, s, steps))
            np.testing.assert_array_equal(count, np.minimum(n_c, steps))
            np.testing.assert_array_equal(count, count_p)
            assert (count[[0, 1, 5]] == steps).all() and count[2] == 1 and count[3] == 0
            for t in range(nt):
                c = count[t]
                np.testing.assert_array_equal(rows[:5, t, :c], d_c[:5, t, :c])
                np.testing.assert_array_equal(rows[:5, t, :c], rows_p[:5, t, :c])
                if t in tied_tasks:
                    continue
                # the untied loop's own selections, in step order, are the same rows
                assert count_u[t] == c and len(set(sel[t, :c])) == c
                np.testing.assert_array_equal(sel_score[t, :c], d_c[4, t, :c])
                np.testing.assert_array_equal(np.asarray(d)[:4, t, sel[t, :c]], d_c[:4, t, :c])
            assert (np.asarray(d)[4] != d_c[4])[:, :steps].any()  # scores were decayed
            assert (n_c < n).any()  # and boxes removed


def test_untied_loop_with_a_removed_duplicate_of_a_later_selection():
    """A box removed by a decay whose exact duplicate (a higher score, survived) is
    selected later: IoU 1 with a dead entry (linear weight 0) must leave it dead, and the
    rows equal the C-order loop's."""
    s = pp.PostprocessSettings(method="soft_linear", pixel_offset=1)
    dets = np.array(
        [
            [0, 0, 1000, 1002.5, 0.2],  # removed by the next box (0.2 * 0.0025 < 0.001)
            [0, 0, 1000, 1000, 0.95],
            [0, 0, 1000, 1002.5, 0.9],  # the duplicate: survives (0.00224), selected 3rd
            [2000, 2000, 2100, 2100, 0.5],
            [2000, 2000, 2100, 2100.4, 0.3],
        ],
        F32,
    )
    d = loops.stack_buffer(tuple(jnp.asarray(dets[None, :, k]) for k in range(5)), 1)
    n = jnp.array([5], jnp.int32)
    d_c, n_c = map(np.asarray, jit_loop(loops.soft_nms)(d, n, s, 5))
    sel, sel_score, count, tied = map(np.asarray, jit_loop(untied.soft_nms_untied)(d, n, s, 5))
    assert n_c[0] == 4 and count[0] == 4 and not tied[0]
    np.testing.assert_array_equal(sel[0, :4], [1, 3, 2, 4])
    np.testing.assert_array_equal(sel_score[0, :4], d_c[4, 0, :4])
    assert np.isfinite(sel_score[0, :4]).all()
    rows, cnt = map(np.asarray, jit_loop(untied.soft_nms_rows)(d, n, s, 5))
    assert cnt[0] == 4
    np.testing.assert_array_equal(rows[:5, 0, :4], d_c[:5, 0, :4])


def test_first_and_last_maximum_and_top1():
    rng = np.random.default_rng(12)
    score = rng.integers(0, 4, (50, 9)).astype(F32)
    live = rng.random((50, 9)) < 0.7
    live[0] = False
    masked = np.where(live, score, -np.inf)
    first = np.asarray(loops.first_max(jnp.asarray(score), jnp.asarray(live)))
    last = np.asarray(loops.last_max(jnp.asarray(score), jnp.asarray(live)))
    best, pos, count = map(np.asarray, untied.top1(jnp.asarray(masked)))
    has = live.any(1)
    np.testing.assert_array_equal(first[has], np.argmax(masked, 1)[has])
    np.testing.assert_array_equal(last[has], 8 - np.argmax(masked[:, ::-1], 1)[has])
    np.testing.assert_array_equal(pos[has], first[has])
    np.testing.assert_array_equal(best, masked.max(1))
    np.testing.assert_array_equal(count[has], (masked == masked.max(1)[:, None]).sum(1)[has])
    assert ((first >= 0) & (first < 9) & (last >= 0) & (last < 9)).all()


def test_fast_candidates_equal_plain():
    """`tasks.select_candidates` (packed sort key, any subset of rows) = `plain.candidates`
    of those rows, with the dropped counts."""
    rng = np.random.default_rng(13)
    b, t, u, kb = 2, 6, 300, 40
    sc = np.where(rng.random((b, t, u)) < 0.2, rng.integers(1, 5, (b, t, u)) / 5, -1).astype(F32)
    counts = (sc > 0).sum(2).astype(np.int32)
    assert counts.max() > kb
    idx_p, vals_p, n_p = map(np.asarray, plain.candidates(jnp.asarray(sc), jnp.asarray(counts), kb))
    for rows in (None, np.array([[4, 0], [1, 2]]), np.array([[5, 3, 1, 0], [0, 1, 2, 3]])):
        got = tasks.select_candidates(jnp.asarray(sc), jnp.asarray(counts), kb,
                                      None if rows is None else jnp.asarray(rows))  # fmt: skip
        idx, vals, n, dropped = map(np.asarray, got)
        pick = np.arange(b * t) if rows is None else (np.arange(b)[:, None] * t + rows).ravel()
        np.testing.assert_array_equal(n, n_p[pick])
        np.testing.assert_array_equal(dropped, counts.ravel()[pick] - n)
        valid = np.arange(kb) < n[:, None]
        np.testing.assert_array_equal(idx, idx_p[pick])  # padding slots hold U in both
        np.testing.assert_array_equal(vals[valid], vals_p[pick][valid])


def test_prefilters_cover_every_candidate():
    """The exp-free pre-filter on logits keeps every prior with a candidate (and some that
    only look like one); on probabilities it is exact."""
    rng = np.random.default_rng(14)
    logits = (rng.standard_normal((2, 3000, 9)) * 3).astype(F32)
    logits[0, :, 0] += 3.0
    probs = np.asarray(
        scoring.softmax_rows(jnp.asarray(logits), *scoring.softmax_parts(jnp.asarray(logits)))
    )
    for thr in (0.1, 0.5, 0.9):
        exact = (probs[..., 1:] > F32(thr)).any(-1)
        maybe = np.asarray(scoring.LogitScorer(None, jnp.asarray(logits), None, None, (0.1, 0.2))
                           .maybe_candidates(thr))  # fmt: skip
        prob = np.asarray(scoring.ProbabilityScorer(None, jnp.asarray(probs), None)
                          .maybe_candidates(thr))  # fmt: skip
        assert exact.any() and (maybe >= exact).all() and maybe.sum() < exact.size
        np.testing.assert_array_equal(prob, exact)


def test_static_layouts():
    """The small settings compile sparse fast at two buffers / tiered / all classes at 100
    priors, tiered / all classes at 200, then tiered / plain on all 600; without the
    speed knobs only the plain layout is left."""
    small = small_layouts(make_cfg())
    static = layouts.static_layouts(8, 600, 600, small)
    assert [u for u, _ in static] == [100] * 4 + [200] * 2 + [600] * 2
    assert [t for _, t in static[:4]] == [((2, 30),), ((2, 60),), ((3, 100), (5, 40)), ((8, 100),)]
    assert static[-1] == (600, ((8, 600),))
    bare = dataclasses.replace(small, tier_classes=0, sparse_priors=0, fast_priors=0)
    assert layouts.static_layouts(8, 600, 600, bare) == [(600, ((8, 600),))]


# (candidates per class c = 1..8, prior range, look-alike priors) -> the layout it selects
# with `small_layouts` and candidates_per_class 1000 (index into layouts.static_layouts)
KINDS = {
    "fast": ([20, 10, 0, 0, 0, 0, 0, 0], 100, 0, 0),
    "fast x2": ([55, 50, 0, 0, 0, 0, 0, 0], 100, 0, 1),
    "sparse tiered": ([60, 50, 30, 5, 5, 0, 0, 0], 100, 0, 2),
    "sparse all": ([60, 55, 50, 50, 50, 0, 0, 0], 100, 0, 3),
    "look-alikes": ([20, 10, 0, 0, 0, 0, 0, 0], 100, 150, 4),
    "sparse 200 tiered": ([120, 50, 0, 0, 0, 0, 0, 0], 200, 0, 4),
    "sparse 200 all": ([60, 55, 50, 50, 50, 0, 0, 0], 200, 0, 5),
    "crowded": ([300, 250, 200, 30, 20, 10, 5, 0], 600, 0, 6),
    "dense": ([300, 250, 200, 150, 100, 50, 30, 10], 600, 0, 7),
    "none": ([0] * 8, 600, 0, 0),
}


def kind_logits(rng, kind, batch=3, num_priors=600):
    """Logits [batch, P, 9] with the candidate counts of KINDS[kind] in every image;
    equal rows (exact ties) on purpose; 'ties': the palette rows of `clustered_case`."""
    if kind == "ties":
        return clustered_case(rng, batch, num_priors, 9, palette=6)[1]
    counts, span, lookalike, _ = KINDS[kind]
    logits = np.zeros((batch, num_priors, 9), F32)
    logits[..., 0] = 5.0
    for b in range(batch):
        for j, n in enumerate(counts):
            pick = rng.choice(span, n, replace=False)
            # a small per-class offset keeps rows that only permute values apart (equal
            # in exact arithmetic, they could round apart in two softmax shapes)
            logits[b, pick, j + 1] = 8.0 + 0.01 * j + rng.integers(0, 3, n)
        if lookalike:  # exp(l - max) just above the threshold, the softmax just under it
            free = np.flatnonzero(logits[b, :, 1:].max(1) == 0)[-lookalike:]
            logits[b, free, 1 + rng.integers(0, 8, lookalike)] = 5.0 + np.log(0.1) + 0.05
    return logits


def assert_same(got, want, exact=True):
    """Equal outputs; with exact=False boxes and scores only to float32 rounding."""
    for k in KEYS:
        if k in ("boxes", "scores") and not exact:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


COMBOS = [  # method, pixel_offset, max_per_image, candidates_per_class: every value of
    # every setting at least once, each method with both candidate sizes across the set
    ("soft_linear", 1, 0, 1000),
    ("soft_gaussian", 0, 40, 150),
    ("hard", 1, 40, 150),
    ("hard", 0, 0, 1000),
]


@pytest.mark.parametrize("method,offset,max_per_image,cpc", COMBOS)
def test_fast_equals_plain_on_random_batches(method, offset, max_per_image, cpc):
    """Every layout and loop of the fast path against the plain one, on batches of every
    kind (few / some / many candidates, look-alikes for the pre-filter, dense, crowded,
    exact ties, none): `nms` bit for bit; `detect` too, except boxes and scores on the
    sparse layouts: they decode and soft-max gathered priors, which XLA rounds in the last
    bit differently from all priors of a batch (see the package docstring)."""
    rng = np.random.default_rng(20 + COMBOS.index((method, offset, max_per_image, cpc)))
    cfg = make_cfg(method=method, pixel_offset=offset, max_per_image=max_per_image,
                   candidates_per_class=cpc, keep_per_class=20,
                   iou_threshold=0.45 if method == "hard" else 0.3)  # fmt: skip
    fast = small_layouts(cfg)
    slow = dataclasses.replace(fast, fast=False)
    priors = clustered_case(rng, 1, 600, 9, spread=0.1)[2]
    hw = np.array([[375, 500], [480, 640], [128, 96]], F32)
    seen, work = set(), 0
    for kind in [*KINDS, "ties"]:
        logits = kind_logits(rng, kind)
        loc = (rng.standard_normal((3, 600, 4)) * 0.2).astype(F32)
        index = pp.layout_index(logits, fast)
        if cpc == 1000 and kind in KINDS:
            assert index == KINDS[kind][3], kind
        seen.add(index)
        u = layouts.static_layouts(8, 600, min(cpc, 600), fast)[index][0]
        want = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, slow, hw))
        got = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, fast, hw))
        assert_same(got, want, exact=u == 600)
        boxes, scores = pp.decode_and_score(loc, logits, priors, cfg)
        want = jax.tree.map(np.asarray, pp.nms(boxes, scores, slow, hw))
        got = jax.tree.map(np.asarray, pp.nms(boxes, scores, fast, hw))
        assert_same(got, want)
        work += int(want["valid"].sum())
        if kind == "none":
            assert not want["valid"].any()
        if kind == "dense" and cpc < 600:
            assert (want["num_dropped"] > 0).any()
    assert seen == set(range(8)) and work > 200


def test_fast_equals_plain_over_1000_candidates():
    """A class with ~2100 candidates, beyond candidates_per_class = 1000 (dropped and
    counted) and within it (2304): fast = plain, soft and hard, detect and nms."""
    rng = np.random.default_rng(5)
    loc, logits, priors = clustered_case(rng, 1, 2500, 3, palette=40, dup_frac=0.02)
    logits[0, :2100, 1] += 6.0
    hw = np.array([[480, 640]], F32)
    for method, cpc in (("soft_linear", 1000), ("hard", 2304)):
        cfg = make_cfg(method=method, candidates_per_class=cpc)
        fast = pp.PostprocessSettings.from_config(cfg)
        slow = dataclasses.replace(fast, fast=False)
        want = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, slow, hw))
        got = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, fast, hw))
        assert_same(got, want)
        assert (want["num_dropped"][0, 1] > 1000) == (cpc == 1000)
        boxes, scores = pp.decode_and_score(loc, logits, priors, cfg)
        want = jax.tree.map(np.asarray, pp.nms(boxes, scores, slow, hw))
        assert_same(jax.tree.map(np.asarray, pp.nms(boxes, scores, fast, hw)), want)
