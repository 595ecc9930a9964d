"""detect(): decode + per-class (soft-)NMS + per-image cap vs a numpy emulation of the
original's Detect / nms_process / cpu_soft_nms (ORIGINAL.md §3, §5).

The reference below is written from the description of the original code: a per-class
Python loop over float32 numpy arrays, the C soft-NMS loop transcribed statement by
statement (scalar float32 arithmetic, in-place swaps, swap-with-last removal, the
`range(N)` bound evaluated once), greedy hard NMS with '>' suppression, and the
max_per_image `>=` rule. It is fed the boxes/scores of `decode_and_score` (the same
arrays `detect` builds), so NMS decisions can be compared exactly: per-class counts and
order exact, boxes within 1e-3 px, scores within 1e-6.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax import postprocess as pp
from m2det_jax.config import default_config
from m2det_jax.priors import prior_boxes

F32 = np.float32


# ------------------------------------------------------------------ numpy reference
def softmax_ref(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(F32)


def decode_ref(loc, priors, variance, hw=None):
    c = priors[:, :2] + loc[:, :2] * F32(variance[0]) * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * F32(variance[1]))
    x1 = c - wh / F32(2)
    boxes = np.concatenate([x1, x1 + wh], 1)
    if hw is not None:
        boxes = boxes * np.array([hw[1], hw[0], hw[1], hw[0]], F32)
    return boxes.astype(F32)


def cpu_soft_nms_ref(boxes, sigma, nt, threshold, method, offset, max_steps=None):
    """The original's cpu_soft_nms on float32 boxes [N, 5], in place; returns keep.

    method 1 linear, 2 gaussian. `max_steps` stops after that many selections (rows after
    them are never returned by nms_process; `test_early_stop_is_exact` checks it).
    """
    sigma, nt, threshold, one = F32(sigma), F32(nt), F32(threshold), F32(offset)
    n = boxes.shape[0]
    for i in range(n):  # Cython evaluates range(N) once; steps past the final N are no-ops
        if max_steps is not None and i >= max_steps:
            break
        maxscore = boxes[i, 4]
        maxpos = i
        tx1, ty1, tx2, ty2, ts = boxes[i]
        pos = i + 1
        while pos < n:
            if maxscore < boxes[pos, 4]:
                maxscore = boxes[pos, 4]
                maxpos = pos
            pos = pos + 1
        boxes[i] = boxes[maxpos]
        boxes[maxpos] = (tx1, ty1, tx2, ty2, ts)
        tx1, ty1, tx2, ty2, ts = boxes[i]
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2, s = boxes[pos]
            area = (x2 - x1 + one) * (y2 - y1 + one)
            iw = min(tx2, x2) - max(tx1, x1) + one
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + one
                if ih > 0:
                    ua = F32((tx2 - tx1 + one) * (ty2 - ty1 + one) + area - iw * ih)
                    ov = iw * ih / ua
                    if method == 1:
                        weight = F32(1) - ov if ov > nt else F32(1)
                    else:  # np.exp of a Python float (double), stored in a C float
                        weight = F32(np.exp(float(-(ov * ov) / sigma)))
                    boxes[pos, 4] = weight * boxes[pos, 4]
                    if boxes[pos, 4] < threshold:
                        boxes[pos] = boxes[n - 1]
                        n = n - 1
                        pos = pos - 1
            pos = pos + 1
    return list(range(n))


def greedy_nms_ref(dets, thresh, offset, max_keep=None):
    """gpu_nms: descending score (equal scores in row order), suppress IoU > thresh."""
    one, thresh = F32(offset), F32(thresh)
    order = np.argsort(-dets[:, 4], kind="stable")
    suppressed = np.zeros(len(dets), bool)
    keep = []
    for k, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        for j in order[k + 1 :]:
            a, b = dets[i], dets[j]
            w = max(min(a[2], b[2]) - max(a[0], b[0]) + one, F32(0))
            h = max(min(a[3], b[3]) - max(a[1], b[1]) + one, F32(0))
            inter = w * h
            sa = (a[2] - a[0] + one) * (a[3] - a[1] + one)
            sb = (b[2] - b[0] + one) * (b[3] - b[1] + one)
            if inter / (sa + sb - inter) > thresh:
                suppressed[j] = True
    return keep


def nms_process_ref(boxes, scores, p, full=False):
    """One image: ({class: [n, 5] rows}, {class: dropped}) as the original's nms_process.

    `candidates_per_class` (not in the original) keeps the highest scores, lower prior
    index first on ties, in prior order.
    """
    out, dropped = {}, {}
    steps = None if full else p.keep_per_class
    for j in range(1, scores.shape[1]):
        inds = np.where(scores[:, j] > F32(p.score_threshold))[0]
        dropped[j] = max(len(inds) - p.candidates_per_class, 0)
        if dropped[j]:
            top = np.argsort(-scores[inds, j], kind="stable")[: p.candidates_per_class]
            inds = np.sort(inds[top])
        if len(inds) == 0:
            out[j] = np.empty([0, 5], F32)
            continue
        dets = np.hstack((boxes[inds], scores[inds, j][:, None])).astype(F32, copy=False)
        if p.method == "hard":
            keep = greedy_nms_ref(dets, p.iou_threshold, p.pixel_offset, steps)
        else:
            m = 1 if p.method == "soft_linear" else 2
            keep = cpu_soft_nms_ref(
                dets, p.sigma, p.iou_threshold, p.min_score, m, p.pixel_offset, steps
            )
        out[j] = dets[keep[: p.keep_per_class], :]
    if p.max_per_image > 0:
        image_scores = np.hstack([out[j][:, -1] for j in out])
        if len(image_scores) > p.max_per_image:
            image_thresh = np.sort(image_scores)[-p.max_per_image]
            for j in out:
                out[j] = out[j][np.where(out[j][:, -1] >= image_thresh)[0], :]
    return out, dropped


# ------------------------------------------------------------------ helpers
def make_cfg(**post):
    cfg = default_config()
    for k, v in post.items():
        cfg.postprocess[k] = v
    return cfg


def run_both(loc, logits, priors, cfg, hw=None, full=False):
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, cfg, hw))
    boxes, scores = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg, hw))
    refs = [nms_process_ref(boxes[b], scores[b], cfg.postprocess, full) for b in range(len(loc))]
    return out, refs


def class_rows(out, b, j):
    m = out["valid"][b] & (out["classes"][b] == j)
    return np.concatenate([out["boxes"][b][m], out["scores"][b][m][:, None]], 1)


def assert_layout(out, num_classes, p):
    b, k = out["scores"].shape
    rows = (num_classes - 1) * p.keep_per_class
    assert out["boxes"].shape == (b, k, 4) and out["classes"].dtype == np.int32
    assert out["valid"].dtype == bool and out["num_dropped"].shape == (b, num_classes)
    assert ((out["classes"] >= 1) & (out["classes"] < num_classes)).all()
    assert (out["scores"][~out["valid"]] == 0).all() and (out["boxes"][~out["valid"]] == 0).all()
    if p.max_per_image > 0:
        assert k == min(p.max_per_image, rows)
        # kept rows are packed in front
        assert (np.sort(~out["valid"], axis=1, kind="stable") == ~out["valid"]).all()
    else:
        assert k == rows
        expect = np.repeat(np.arange(1, num_classes), p.keep_per_class)
        assert (out["classes"] == expect).all()


def fit_to_k(ref, p):
    """What `detect` returns for a reference image when the >= rule keeps more than
    max_per_image rows (exact float32 ties at the threshold): every row above the
    threshold, and the first tied rows in class / selection order. -> (rows, cut)."""
    total = sum(len(r) for r in ref.values())
    if p.max_per_image <= 0 or total <= p.max_per_image:
        return ref, 0
    thresh = min(r[:, 4].min() for r in ref.values() if len(r))
    budget = p.max_per_image - sum(int((r[:, 4] > thresh).sum()) for r in ref.values())
    out = {}
    for j, r in ref.items():
        tied = r[:, 4] == thresh
        rank = np.cumsum(tied)
        keep = (r[:, 4] > thresh) | (tied & (rank <= budget))
        budget -= int(tied[keep].sum())
        out[j] = r[keep]
    return out, total - p.max_per_image


def assert_matches(out, refs, num_classes, p, score_tol=1e-6, box_tol=1e-3):
    assert_layout(out, num_classes, p)
    for b, (ref, dropped) in enumerate(refs):
        ref, cut = fit_to_k(ref, p)
        assert out["num_tie_dropped"][b] == cut
        for j in range(1, num_classes):
            got = class_rows(out, b, j)
            assert got.shape == ref[j].shape, (b, j, got.shape, ref[j].shape)
            np.testing.assert_allclose(got[:, :4], ref[j][:, :4], rtol=0, atol=box_tol)
            np.testing.assert_allclose(got[:, 4], ref[j][:, 4], rtol=0, atol=score_tol)
            assert out["num_dropped"][b, j] == dropped[j]
        assert out["num_dropped"][b, 0] == 0


def clustered_case(rng, batch, num_priors, num_classes, palette=12, dup_frac=0.1, spread=0.03):
    """Priors in a few dense clusters (+ exact duplicates), logits from a small palette of
    rows, so many scores tie exactly and soft-NMS both decays and removes boxes."""
    centers = rng.uniform(0.2, 0.8, (6, 2))
    c = centers[rng.integers(0, 6, num_priors)] + rng.normal(0, spread, (num_priors, 2))
    wh = rng.uniform(0.08, 0.3, (num_priors, 2)) * (0.03 / spread) ** 0.5
    priors = np.concatenate([c, wh], 1).astype(F32)
    dup = rng.random(num_priors) < dup_frac
    priors[dup] = priors[rng.integers(0, num_priors, dup.sum())]
    loc = (rng.standard_normal((batch, num_priors, 4)) * 0.2).astype(F32)
    loc[:, dup] = 0
    rows = rng.normal(0, 1.5, (palette, num_classes)).astype(F32)
    rows[:, 0] += rng.uniform(-2, 2, palette).astype(F32)
    logits = rows[rng.integers(0, palette, (batch, num_priors))]
    return loc, logits, priors


def grid_boxes_case(boxes_px, score_logits, size=128.0):
    """Exact geometry: priors whose decoded boxes (loc = 0) are `boxes_px` in a
    size x size image (dyadic coordinates, so decode is exact)."""
    b = np.asarray(boxes_px, np.float64) / size
    priors = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                       b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).astype(F32)  # fmt: skip
    loc = np.zeros((1, len(b), 4), F32)
    logits = np.asarray(score_logits, F32)[None]
    hw = np.array([[size, size]], F32)
    return loc, logits, priors, hw


# ------------------------------------------------------------------ tests
def test_decode_and_score_matches_numpy():
    rng = np.random.default_rng(1)
    cfg = make_cfg()
    priors = prior_boxes(cfg)[:2000]
    loc = (rng.standard_normal((2, 2000, 4)) * 0.5).astype(F32)
    logits = (rng.standard_normal((2, 2000, 81)) * 3).astype(F32)
    hw = np.array([[375, 500], [640, 427]], F32)
    boxes, scores = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg, hw))
    nboxes, _ = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg))
    for b in range(2):
        np.testing.assert_allclose(scores[b], softmax_ref(logits[b]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(boxes[b], decode_ref(loc[b], priors, (0.1, 0.2), hw[b]),
                                   rtol=0, atol=1e-3)  # fmt: skip
        np.testing.assert_allclose(nboxes[b], decode_ref(loc[b], priors, (0.1, 0.2)),
                                   rtol=0, atol=1e-6)  # fmt: skip


CASES = [  # method, pixel_offset, max_per_image
    ("soft_linear", 1, 0),  # the original
    ("soft_linear", 0, 40),
    ("soft_gaussian", 1, 40),
    ("soft_gaussian", 0, 0),
    ("hard", 1, 0),
    ("hard", 0, 40),
]


@pytest.mark.parametrize("method,offset,max_per_image", CASES)
def test_random_clusters_match_reference(method, offset, max_per_image):
    rng = np.random.default_rng(10 + CASES.index((method, offset, max_per_image)))
    loc, logits, priors = clustered_case(rng, 3, 400, 5)
    hw = np.array([[375, 500], [480, 640], [128, 96]], F32)
    cfg = make_cfg(method=method, pixel_offset=offset, max_per_image=max_per_image,
                   iou_threshold=0.45 if method == "hard" else 0.3)  # fmt: skip
    out, refs = run_both(loc, logits, priors, cfg, hw)
    assert max(len(r[0][j]) for r in refs for j in r[0]) > 10  # real work happened
    # gaussian: XLA's float32 exp vs the original's double exp -> a few ulp
    tol = 1e-6 if method != "soft_gaussian" else 2e-6
    assert_matches(out, refs, 5, cfg.postprocess, score_tol=tol)


def test_normalized_boxes_without_image_sizes():
    rng = np.random.default_rng(2)
    loc, logits, priors = clustered_case(rng, 2, 400, 5)
    cfg = make_cfg()
    out, refs = run_both(loc, logits, priors, cfg, None)
    assert_matches(out, refs, 5, cfg.postprocess, box_tol=1e-6)
    assert np.abs(out["boxes"]).max() < 3  # normalized, not pixels


def test_early_stop_is_exact():
    """Rows never change after they are selected: stopping the C loop after
    keep_per_class selections returns the same rows as running it to the end."""
    rng = np.random.default_rng(3)
    loc, logits, priors = clustered_case(rng, 1, 400, 3, spread=0.25)
    for method in ("soft_linear", "soft_gaussian"):
        cfg = make_cfg(method=method, keep_per_class=20)
        boxes, scores = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg))
        full, _ = nms_process_ref(boxes[0], scores[0], cfg.postprocess, full=True)
        short, _ = nms_process_ref(boxes[0], scores[0], cfg.postprocess, full=False)
        assert any(len(full[j]) == 20 for j in full)
        for j in full:
            np.testing.assert_array_equal(full[j], short[j])


def test_no_candidates():
    rng = np.random.default_rng(4)
    loc, logits, priors = clustered_case(rng, 2, 400, 5)
    logits[..., 0] = 50.0  # background everywhere
    cfg = make_cfg()
    out, refs = run_both(loc, logits, priors, cfg, np.array([[100, 100], [50, 60]], F32))
    assert not out["valid"].any() and (out["num_dropped"] == 0).all()
    assert_matches(out, refs, 5, cfg.postprocess)


def test_class_with_more_than_1000_candidates():
    rng = np.random.default_rng(5)
    loc, logits, priors = clustered_case(rng, 1, 2500, 3, palette=40, dup_frac=0.02)
    logits[0, :2100, 1] += 6.0  # class 1: ~2100 candidates
    hw = np.array([[480, 640]], F32)
    for cpc in (2048 + 256, 1000):
        cfg = make_cfg(candidates_per_class=cpc)
        out, refs = run_both(loc, logits, priors, cfg, hw)
        n1 = int((np.asarray(pp.decode_and_score(loc, logits, priors, cfg)[1])[0, :, 1]
                  > F32(0.1)).sum())  # fmt: skip
        assert n1 > 2000
        assert out["num_dropped"][0, 1] == max(n1 - cpc, 0)
        assert_matches(out, refs, 3, cfg.postprocess)


def test_known_answer_linear_and_hard():
    # A and B overlap with IoU 1/3 (pixel_offset 0), C is far away.
    loc, logits, priors, hw = grid_boxes_case(
        [[0, 0, 10, 10], [5, 0, 15, 10], [64, 64, 96, 96]],
        [[0, 2.0], [0, 1.5], [0, 1.0]],
    )
    cfg = make_cfg(pixel_offset=0)
    s = np.asarray(pp.decode_and_score(loc, logits, priors, cfg, hw)[1])[0, :, 1]
    third = F32(50) / F32(150)
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, cfg, hw))
    got = class_rows(out, 0, 1)
    # order A, C, B; B decayed by (1 - 1/3)
    np.testing.assert_array_equal(got[:, :4], [[0, 0, 10, 10], [64, 64, 96, 96], [5, 0, 15, 10]])
    np.testing.assert_array_equal(got[:, 4], [s[0], s[2], (F32(1) - third) * s[1]])
    # hard NMS at 0.3: B suppressed; at 0.45 it stays, in score order
    for thr, rows in ((0.3, [0, 2]), (0.45, [0, 1, 2])):
        out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors,
                                                 make_cfg(method="hard", pixel_offset=0,
                                                          iou_threshold=thr), hw))  # fmt: skip
        np.testing.assert_array_equal(class_rows(out, 0, 1)[:, 4], s[rows])
    # with the +1 convention: areas 11 x 11, overlap 6 x 11 -> IoU 66 / 176
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(), hw))
    ov = F32(66) / F32(176)
    assert class_rows(out, 0, 1)[2, 4] == (F32(1) - ov) * s[1]


def test_ties_follow_the_c_loops_array_order():
    # P2 wins step 0 and is swapped with P0, so the array is [P2, P1, P0]: P1 comes before
    # P0 although P0 is first in prior order (all three far apart).
    loc, logits, priors, hw = grid_boxes_case(
        [[0, 0, 8, 8], [32, 32, 40, 40], [64, 64, 72, 72]], [[0, 0], [0, 0], [0, 3]]
    )
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(), hw))
    np.testing.assert_array_equal(class_rows(out, 0, 1)[:, 0], [64, 32, 0])
    # P1 duplicates P0 (IoU 1 -> score 0 -> removed): the last box P3 is copied into its
    # slot, so P3 comes before P2 although both tie and P2 is first in prior order.
    loc, logits, priors, hw = grid_boxes_case(
        [[0, 0, 8, 8], [0, 0, 8, 8], [32, 32, 40, 40], [64, 64, 72, 72]],
        [[0, 3], [0, 0], [0, 0], [0, 0]],
    )
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(), hw))
    np.testing.assert_array_equal(class_rows(out, 0, 1)[:, 0], [0, 64, 32])
    # hard NMS: equal scores in prior order
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(method="hard"), hw))
    np.testing.assert_array_equal(class_rows(out, 0, 1)[:, 0], [0, 32, 64])


def test_untied_loop_equals_the_c_order_loop_and_flags_ties():
    """`_soft_nms_untied` (entries never move) gives the C-order loop's rows, bit for bit,
    on random buffers with decays and removals; it flags a task exactly when a step's
    maximum was tied, and `_soft_nms_rows` then returns the C-order rows."""
    rng = np.random.default_rng(11)
    nt, kb, steps = 6, 40, 25
    xy = rng.uniform(0, 60, (nt, kb, 2)).astype(F32)
    wh = rng.uniform(8, 40, (nt, kb, 2)).astype(F32)
    score = rng.uniform(0.1, 1.0, (nt, kb)).astype(F32)
    n = np.array([40, 33, 1, 0, 17, 40], np.int32)
    for method in ("soft_linear", "soft_gaussian"):
        s = pp.PostprocessSettings(method=method, min_score=0.05)
        for tied_tasks in ((), (1, 4)):
            sc = score.copy()
            for t in tied_tasks:  # two live entries at the top score
                sc[t, 3] = sc[t, 7] = F32(1.5)
            d = pp._stack_buffer((xy[..., 0], xy[..., 1], (xy + wh)[..., 0], (xy + wh)[..., 1],
                                  sc), s.pixel_offset)  # fmt: skip
            d_c, n_c = map(np.asarray, jax.jit(pp._soft_nms, static_argnums=(2, 3))(d, n, s, steps))
            sel, sel_score, count_u, tied = map(
                np.asarray, jax.jit(pp._soft_nms_untied, static_argnums=(2, 3))(d, n, s, steps)
            )
            np.testing.assert_array_equal(np.flatnonzero(tied), tied_tasks)
            rows, count = map(np.asarray, jax.jit(pp._soft_nms_rows, static_argnums=(2, 3))(d, n, s, steps))
            np.testing.assert_array_equal(count, np.minimum(n_c, steps))
            assert (count[[0, 1, 5]] == steps).all() and count[2] == 1 and count[3] == 0
            for t in range(nt):
                c = count[t]
                np.testing.assert_array_equal(rows[:5, t, :c], d_c[:5, t, :c])
                if t in tied_tasks:
                    continue
                # the untied loop's own selections, in step order, are the same rows
                assert count_u[t] == c and len(set(sel[t, :c])) == c
                np.testing.assert_array_equal(sel_score[t, :c], d_c[4, t, :c])
                np.testing.assert_array_equal(np.asarray(d)[:4, t, sel[t, :c]], d_c[:4, t, :c])
            assert (np.asarray(d)[4] != d_c[4])[:, :steps].any()  # scores were decayed
            assert (n_c < n).any()  # and boxes removed


def test_saturated_ties_stress():
    """Many boxes at score exactly 1.0 on an exact grid, overlapping in chains and with
    duplicates: the selection order is decided by the C loop's swaps alone."""
    rng = np.random.default_rng(6)
    boxes = []
    for _ in range(300):
        x, y = rng.integers(0, 28, 2) * 4
        w, h = rng.integers(2, 9, 2) * 4
        boxes.append([x, y, x + w, y + h])
    boxes += boxes[:40]  # exact duplicates
    logit_rows = np.where(rng.random((len(boxes), 1)) < 0.7, [[0, 40, 0]], [[0, 40, 40]])
    loc, logits, priors, hw = grid_boxes_case(boxes, logit_rows, size=128.0)
    for method, offset in (("soft_linear", 1), ("soft_linear", 0), ("hard", 1)):
        cfg = make_cfg(method=method, pixel_offset=offset)
        out, refs = run_both(loc, logits, priors, cfg, hw)
        assert (refs[0][0][1][:, 4] == refs[0][0][1][0, 4]).sum() > 5  # real ties
        # exact geometry and scores: bit-identical
        assert_matches(out, refs, 3, cfg.postprocess, score_tol=0, box_tol=0)


def test_max_per_image_ties_are_reported():
    # every class gets the same rows (same logits for classes 1..3): the >= rule keeps
    # tied rows beyond max_per_image; those that do not fit are counted.
    loc, logits, priors, hw = grid_boxes_case(
        [[0, 0, 8, 8], [32, 32, 40, 40], [64, 64, 72, 72]],
        [[0, 2, 2, 2], [0, 1, 1, 1], [0, 1.5, 1.5, 1.5]],
    )
    cfg = make_cfg(max_per_image=4)
    out, refs = run_both(loc, logits, priors, cfg, hw)
    ref = refs[0][0]
    kept = sum(len(ref[j]) for j in ref)
    assert kept == 6  # 3 rows at the top score + 3 tied at the 4th score
    assert out["num_tie_dropped"][0] == kept - 4
    assert out["valid"][0].all()
    got = np.concatenate([class_rows(out, 0, j) for j in (1, 2, 3)])
    ref_rows = np.concatenate([ref[j] for j in (1, 2, 3)])
    # every row above the threshold, then the first tied rows in class order
    np.testing.assert_array_equal(np.sort(got[:, 4]), np.sort(ref_rows[:, 4])[-4:])
    np.testing.assert_array_equal(out["classes"][0], [1, 1, 2, 3])


def test_81_classes_full_size_priors():
    """Priors of input 320 and 81 classes: an image with a few small objects (runs the
    sparse + tiered layout) and a crowded one (candidates in every class: the tiered
    layout), each equal to the reference. The plain layout runs in the other tests."""
    cfg = make_cfg()
    priors = prior_boxes(cfg)
    rng = np.random.default_rng(7)
    p = len(priors)
    loc = (rng.standard_normal((2, p, 4)) * 0.3).astype(F32)
    logits = rng.standard_normal((2, p, 81)).astype(F32)
    logits[0, :, 0] += 6.0
    logits[1, :, 0] += 3.5
    for b, n_obj, half in ((0, 4, 0.03), (1, 12, 0.06)):
        for _ in range(n_obj):
            c = rng.integers(1, 81)
            near = np.abs(priors[:, :2] - rng.uniform(0.2, 0.8, 2)).max(1) < half
            logits[b, near, c] += rng.uniform(5, 9, near.sum())
    hw = np.array([[480, 640]], F32)
    settings = pp.PostprocessSettings.from_config(cfg)
    us = [u for u, _ in pp._layouts(80, p, 1000, settings)]
    assert us == [settings.fast_priors] * 4 + [settings.sparse_priors] * 2 + [p, p]
    above = [softmax_ref(logits[b])[:, 1:] > F32(0.1) for b in range(2)]
    assert 0 < above[0].any(1).sum() <= settings.sparse_priors
    counts = np.sort(above[1].sum(0))[::-1]
    assert above[1].any(1).sum() > settings.sparse_priors
    assert counts[-1] > 0 and counts[0] > 64 and counts[settings.tier_classes] <= 64
    for b in range(2):
        out, refs = run_both(loc[b : b + 1], logits[b : b + 1], priors, cfg, hw)
        assert_matches(out, refs, 81, cfg.postprocess)


def test_layouts_are_exact():
    """Every cheaper layout (sparse fast at two buffers / tiered / all classes, then
    tiered / all classes at the second sparse size, then tiered on all priors) gives the
    rows of the plain one, each chosen for a batch it fits; here
    with small layouts so that all of them run on a small problem. Validity, order and
    boxes are identical; scores too on all priors, and within float32 rounding of the
    softmax (XLA rounds exp and the class sum of the gathered rows differently in the
    last bit) on the sparse ones. Some priors only *look* like candidates to the
    exp-free pre-filter (score just under the threshold): they count against the sparse
    sizes but produce nothing."""
    rng = np.random.default_rng(8)
    loc, _, priors = clustered_case(rng, 1, 600, 9, spread=0.1)
    cfg = make_cfg()
    base = pp.PostprocessSettings.from_config(cfg)
    small = pp.PostprocessSettings(**{
        **base.__dict__, "fast_priors": 100, "fast_classes": 2, "fast_candidates": 30,
        "tier_classes": 3, "tier_candidates": 40, "sparse_priors": 200})  # fmt: skip
    plain = pp.PostprocessSettings(
        **{**base.__dict__, "tier_classes": 0, "sparse_priors": 0, "fast_priors": 0}
    )
    layouts = pp._layouts(8, 600, 600, small)
    assert [u for u, _ in layouts] == [100] * 4 + [200] * 2 + [600] * 2
    assert [t for _, t in layouts[:2]] == [((2, 30),), ((2, 60),)]  # fast buffers
    assert [t for _, t in layouts[2:4]] == [((3, 100), (5, 40)), ((8, 100),)]
    assert len(pp._layouts(8, 600, 600, plain)) == 1
    cases = [  # (candidates per class, prior range, look-alike priors) -> layout index
        ([20, 10, 0, 0, 0, 0, 0, 0], 100, 0, 0),
        ([55, 50, 0, 0, 0, 0, 0, 0], 100, 0, 1),
        ([80, 50, 0, 0, 0, 0, 0, 0], 100, 0, 2),
        ([60, 50, 30, 5, 5, 0, 0, 0], 100, 0, 2),
        ([60, 55, 50, 50, 50, 0, 0, 0], 100, 0, 3),
        ([20, 10, 0, 0, 0, 0, 0, 0], 100, 150, 4),
        ([120, 50, 0, 0, 0, 0, 0, 0], 200, 0, 4),
        ([60, 50, 30, 5, 5, 0, 0, 0], 200, 0, 4),
        ([60, 55, 50, 50, 50, 0, 0, 0], 200, 0, 5),
        ([300, 250, 200, 30, 20, 10, 5, 0], 600, 0, 6),
        ([300, 250, 200, 150, 100, 50, 30, 10], 600, 0, 7),
    ]
    fns = {s: jax.jit(lambda lc, c, s=s: pp._nms_all(lc, c, priors, None, s)) for s in (small, plain)}
    for counts, span, lookalike, want_layout in cases:
        logits = np.zeros((1, 600, 9), F32)
        logits[..., 0] = 5.0
        for j, n in enumerate(counts):
            pick = rng.choice(span, n, replace=False)
            # Exact ties between priors with equal rows; a small per-class offset keeps
            # rows that only permute values (equal scores in exact arithmetic, rounded
            # differently by the two softmax shapes) apart.
            logits[0, pick, j + 1] = 8.0 + 0.01 * j + rng.integers(0, 3, n)
        if lookalike:  # exp(l - max) just above the threshold, the softmax just under it
            free = np.flatnonzero(logits[0, :, 1:].max(1) == 0)[-lookalike:]
            logits[0, free, 1 + rng.integers(0, 8, lookalike)] = 5.0 + np.log(0.1) + 0.05
        boxes, scores = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg))
        # (a prior picked by several classes can end under the threshold in some)
        assert np.all((scores[0, :, 1:] > F32(0.1)).sum(0) <= counts)
        assert pp.layout_index(logits, small) == want_layout, counts
        want = jax.tree.map(np.asarray, fns[plain](loc, logits))
        got = jax.tree.map(np.asarray, fns[small](loc, logits))
        assert want[1].any()
        np.testing.assert_array_equal(got[1], want[1])  # valid
        np.testing.assert_array_equal(got[2], want[2])  # dropped
        np.testing.assert_array_equal(got[0][..., :4], want[0][..., :4])  # boxes, in order
        if layouts[want_layout][0] < 600:
            np.testing.assert_allclose(got[0][..., 4], want[0][..., 4], rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(got[0][..., 4], want[0][..., 4])


def test_standard_preset():
    cfg = default_config()
    std = pp.standard_postprocess(cfg)
    assert std.postprocess.pixel_offset == 0 and std.postprocess.max_per_image == 100
    assert cfg.postprocess.pixel_offset == 1 and cfg.postprocess.max_per_image == 0
    assert std.postprocess.method == cfg.postprocess.method


def test_invalid_settings():
    with pytest.raises(ValueError, match="postprocess.method"):
        pp.detect(np.zeros((1, 4, 4), F32), np.zeros((1, 4, 3), F32), np.ones((4, 4), F32),
                  make_cfg(method="nms"))  # fmt: skip


def test_jit_and_batch_sharding(tmp_path):
    """Under an outer jit, with the batch sharded over 4 (fake CPU) devices, detect gives
    the single-device result."""
    code = textwrap.dedent(
        """
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from m2det_jax import postprocess as pp
        from m2det_jax.config import default_config
        rng = np.random.default_rng(0)
        B, N, C = 4, 300, 4
        priors = np.concatenate([rng.uniform(0.3, 0.7, (N, 2)), rng.uniform(0.05, 0.3, (N, 2))],
                                1).astype(np.float32)
        loc = (rng.standard_normal((B, N, 4)) * 0.3).astype(np.float32)
        logits = (rng.standard_normal((B, N, C)) * 2).astype(np.float32)
        hw = rng.uniform(100, 600, (B, 2)).astype(np.float32)
        cfg = default_config()
        ref = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, cfg, hw))
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sh = NamedSharding(mesh, P("batch"))
        fn = pp.make_detect_fn(cfg)
        f = jax.jit(lambda l, g, hw: fn(l, g, priors, hw))
        out = f(jax.device_put(loc, sh), jax.device_put(logits, sh), jax.device_put(hw, sh))
        assert out["boxes"].sharding.spec[0] == "batch", out["boxes"].sharding
        out = jax.tree.map(np.asarray, out)
        # another XLA program: decode may round differently in the last bit (FMA)
        for k in ("valid", "classes", "num_dropped", "num_tie_dropped"):
            np.testing.assert_array_equal(out[k], ref[k])
        np.testing.assert_allclose(out["boxes"], ref["boxes"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(out["scores"], ref["scores"], rtol=0, atol=1e-6)
        print("OK", len(jax.devices()), ref["valid"].sum())
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("OK 4")


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
    d = pp._stack_buffer(tuple(jnp.asarray(dets[None, :, k]) for k in range(5)), 1)
    n = jnp.array([5], jnp.int32)
    d_c, n_c = map(np.asarray, jax.jit(pp._soft_nms, static_argnums=(2, 3))(d, n, s, 5))
    sel, sel_score, count, tied = map(
        np.asarray, jax.jit(pp._soft_nms_untied, static_argnums=(2, 3))(d, n, s, 5)
    )
    assert n_c[0] == 4 and count[0] == 4 and not tied[0]
    np.testing.assert_array_equal(sel[0, :4], [1, 3, 2, 4])
    np.testing.assert_array_equal(sel_score[0, :4], d_c[4, 0, :4])
    assert np.isfinite(sel_score[0, :4]).all()
    rows, cnt = map(np.asarray, jax.jit(pp._soft_nms_rows, static_argnums=(2, 3))(d, n, s, 5))
    assert cnt[0] == 4
    np.testing.assert_array_equal(rows[:5, 0, :4], d_c[:5, 0, :4])
