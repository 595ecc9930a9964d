"""detect(): decode + per-class (soft-)NMS + per-image cap vs the numpy emulation of the
original's Detect / nms_process / cpu_soft_nms (tests/postprocess_reference.py).
"""

import dataclasses

import jax
import numpy as np
import pytest

from m2det_jax.config import default_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference import postprocess as pp
from m2det_jax.inference.postprocess import layouts
from tests.postprocess_reference import (
    CASES,
    F32,
    assert_matches,
    case_81_classes,
    class_rows,
    clustered_case,
    decode_ref,
    grid_boxes_case,
    make_cfg,
    run_both,
    softmax_ref,
)


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
    # hard NMS: P1 is suppressed by P0; P2 and P3 tie: the later prior first (numpy's
    # argsort()[::-1] in the original)
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(method="hard"), hw))
    np.testing.assert_array_equal(class_rows(out, 0, 1)[:, 0], [0, 64, 32])


@pytest.mark.parametrize("offset", [0, 1])
def test_hard_nms_takes_the_later_of_tied_priors(offset):
    """Hard NMS orders candidates as the original's `scores.argsort()[::-1]` (stable
    ascending, reversed): among exactly equal scores the later prior first, so of two
    tied, overlapping boxes the later one survives. Three classes with tied candidates
    (identical logit rows give bit-equal scores); the earlier-prior-first rule would keep
    P0 / P2 / P4 instead, in the fast and in the plain path."""
    a, b = [0, 3, 1, 2], [0, 2, 2.5, 0]  # class 2 is no candidate in rows `a`, class 3 in `b`
    loc, logits, priors, hw = grid_boxes_case(
        [[0, 0, 16, 16], [2, 0, 18, 16],  # P0, P1: IoU ~0.78
         [64, 64, 80, 80], [66, 64, 82, 80],  # P2, P3
         [100, 0, 116, 16], [102, 0, 118, 16]],  # P4, P5
        [a, a, a, a, b, b],
    )  # fmt: skip
    cfg = make_cfg(method="hard", iou_threshold=0.45, pixel_offset=offset)
    scores = np.asarray(pp.decode_and_score(loc, logits, priors, cfg)[1])[0]
    assert len(set(scores[:4, 1])) == 1 and scores[4, 1] == scores[5, 1]  # exact ties
    out, refs = run_both(loc, logits, priors, cfg, hw)
    assert_matches(out, refs, 4, cfg.postprocess, score_tol=0, box_tol=0)
    want = {1: [66, 2, 102], 2: [102], 3: [66, 2]}  # x1 of the rows, in order
    assert {j: class_rows(out, 0, j)[:, 0].tolist() for j in want} == want
    plain = dataclasses.replace(pp.PostprocessSettings.from_config(cfg), fast=False)
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, plain, hw))
    assert {j: class_rows(out, 0, j)[:, 0].tolist() for j in want} == want


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
    loc, logits, hw = case_81_classes(priors, rng)
    settings = pp.PostprocessSettings.from_config(cfg)
    us = [u for u, _ in layouts.static_layouts(80, p, 1000, settings)]
    assert us == [settings.fast_priors] * 4 + [settings.sparse_priors] * 2 + [p, p]
    above = [softmax_ref(logits[b])[:, 1:] > F32(0.1) for b in range(2)]
    assert 0 < above[0].any(1).sum() <= settings.sparse_priors
    counts = np.sort(above[1].sum(0))[::-1]
    assert above[1].any(1).sum() > settings.sparse_priors
    assert counts[-1] > 0 and counts[0] > 64 and counts[settings.tier_classes] <= 64
    for b in range(2):
        out, refs = run_both(loc[b : b + 1], logits[b : b + 1], priors, cfg, hw)
        assert_matches(out, refs, 81, cfg.postprocess)


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
    with pytest.raises(ValueError, match="keep_per_class"):
        pp.PostprocessSettings(keep_per_class=0)
