"""Tests of m2det_jax.losses against a numpy re-statement of the original MultiBoxLoss.

The reference below follows docs/original.md §4 as a per-image Python loop: float32 IoU
(clamped min/max, area_a + area_b - inter, one divide), first-index argmax, the
force-match loop in GT order, encode, smooth L1, hard-negative mining by a stable
descending argsort and its inverse, cross-entropy, division by max(#positives, 1).
Matching runs in float32 as the original; the loss sums run in float64 so the reference
itself is not the source of rounding error. Tolerances: values 1e-5 relative, gradients
1e-7 absolute (against the analytic gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax.config import default_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.train.losses import hard_negatives, match, multibox_loss

F32 = np.float32


# --------------------------------------------------------------------------- reference
def np_point_form(p):
    return np.concatenate([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], axis=1)


def np_iou(a, b):
    """[N, 4] x [M, 4] float32 xyxy -> [N, M], the original's jaccard in float32."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.maximum(rb - lt, F32(0))
    inter = wh[..., 0] * wh[..., 1]
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    return inter / (area_a + area_b - inter)


def np_encode(m, p, var=(0.1, 0.2)):
    g_cxcy = (m[:, :2] + m[:, 2:]) / 2 - p[:, :2]
    g_cxcy = g_cxcy / (var[0] * p[:, 2:])
    g_wh = np.log((m[:, 2:] - m[:, :2]) / p[:, 2:]) / var[1]
    return np.concatenate([g_cxcy, g_wh], axis=1)


def np_match(priors, boxes, labels, valid, thresh=0.5):
    """One image. Returns loc_t [P, 4] (0 off positives), conf_t [P]."""
    num_priors = priors.shape[0]
    truths, labs = boxes[valid], labels[valid]
    if len(truths) == 0:
        return np.zeros((num_priors, 4), F32), np.zeros(num_priors, np.int64)
    overlaps = np_iou(truths, np_point_form(priors))  # [G, P]
    best_prior_idx = overlaps.argmax(1)
    best_truth_overlap = overlaps.max(0)
    best_truth_idx = overlaps.argmax(0)
    best_truth_overlap[best_prior_idx] = 2
    for j in range(best_prior_idx.shape[0]):  # in GT order: the later GT wins
        best_truth_idx[best_prior_idx[j]] = j
    conf = labs[best_truth_idx].astype(np.int64)
    conf[best_truth_overlap < thresh] = 0
    loc_t = np_encode(truths[best_truth_idx], priors)
    loc_t[conf == 0] = 0
    return loc_t, conf


def np_multibox(loc, logits, priors, boxes, labels, valid, thresh=0.5, neg_pos=3):
    """Returns (loc_loss, conf_loss, dloc, dlogits, conf_t), gradients analytic."""
    bsz, num_priors, num_classes = logits.shape
    loc64 = loc.astype(np.float64)
    x = logits.astype(np.float64)
    loc_l = conf_l = 0.0
    n_pos = 0
    dloc = np.zeros_like(loc64)
    dlogits = np.zeros_like(x)
    conf_ts = []
    for b in range(bsz):
        loc_t, conf_t = np_match(priors, boxes[b], labels[b], valid[b], thresh)
        conf_ts.append(conf_t)
        pos = conf_t > 0
        d = loc64[b] - loc_t
        ad = np.abs(d)
        sl1 = np.where(ad < 1, 0.5 * d * d, ad - 0.5)
        loc_l += sl1[pos].sum()
        dloc[b][pos] = np.clip(d, -1, 1)[pos]
        m = x[b].max(1, keepdims=True)
        lse = np.log(np.exp(x[b] - m).sum(1)) + m[:, 0]
        ce = lse - x[b][np.arange(num_priors), conf_t]
        mining = np.where(pos, 0.0, ce)
        order = np.argsort(-mining, kind="stable")
        rank = np.argsort(order, kind="stable")
        num_neg = min(neg_pos * int(pos.sum()), num_priors - 1)
        sel = pos | (rank < num_neg)
        conf_l += ce[sel].sum()
        sm = np.exp(x[b] - lse[:, None])
        sm[np.arange(num_priors), conf_t] -= 1
        dlogits[b][sel] = sm[sel]
        n_pos += int(pos.sum())
    n = max(n_pos, 1)
    return loc_l / n, conf_l / n, dloc / n, dlogits / n, np.stack(conf_ts)


# --------------------------------------------------------------------------- helpers
CFG = default_config()
match_jit = jax.jit(match, static_argnames=("overlap_thresh", "variance", "batch_size"))


def random_priors(rng, num_priors):
    """Random (cx, cy, w, h) priors: distinct areas, so no IoU ties."""
    c = rng.uniform(0.0, 1.0, (num_priors, 2))
    wh = rng.uniform(0.05, 0.6, (num_priors, 2))
    return np.concatenate([c, wh], 1).astype(F32)


def random_batch(rng, bsz, num_gt, num_priors, num_classes, n_valid=None):
    x1y1 = rng.uniform(0.0, 0.7, (bsz, num_gt, 2))
    wh = rng.uniform(0.04, 0.5, (bsz, num_gt, 2))
    boxes = np.concatenate([x1y1, np.minimum(x1y1 + wh, 1.0)], -1).astype(F32)
    labels = rng.integers(1, num_classes, (bsz, num_gt)).astype(np.int32)
    if n_valid is None:
        n_valid = rng.integers(1, num_gt + 1, bsz)
    valid = np.arange(num_gt)[None, :] < np.asarray(n_valid)[:, None]
    # Padding rows hold garbage on purpose: it must never be looked at.
    boxes = np.where(valid[..., None], boxes, rng.uniform(-1, 2, boxes.shape).astype(F32))
    loc = (rng.normal(size=(bsz, num_priors, 4)) * 1.2).astype(F32)
    logits = (rng.normal(size=(bsz, num_priors, num_classes)) * 2.0).astype(F32)
    return loc, logits, boxes, labels, valid


def loss_and_grad(loc, logits, priors, boxes, labels, valid, cfg=CFG, jit=True):
    def total(lc, lg):
        a, b = multibox_loss(lc, lg, priors, boxes, labels, valid, cfg)
        return a + b, (a, b)

    fn = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
    if jit:
        fn = jax.jit(fn)
    (_, (ll, lc)), (gloc, glogits) = fn(jnp.asarray(loc), jnp.asarray(logits))
    return float(ll), float(lc), np.asarray(gloc), np.asarray(glogits)


def assert_matches_reference(loc, logits, priors, boxes, labels, valid):
    ref_l, ref_c, ref_gl, ref_gc, ref_conf_t = np_multibox(
        loc, logits, priors, boxes, labels, valid
    )
    _, conf_t = match_jit(priors, boxes, labels, valid)
    np.testing.assert_array_equal(np.asarray(conf_t), ref_conf_t)
    ll, lc, gl, gc = loss_and_grad(loc, logits, priors, boxes, labels, valid)
    np.testing.assert_allclose(ll, ref_l, rtol=1e-5)
    np.testing.assert_allclose(lc, ref_c, rtol=1e-5)
    np.testing.assert_allclose(gl, ref_gl, rtol=0, atol=1e-7)
    np.testing.assert_allclose(gc, ref_gc, rtol=0, atol=1e-7)
    return ref_conf_t


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1])
def test_random_batches_match_reference(seed):
    rng = np.random.default_rng(seed)
    priors = random_priors(rng, 1500)
    batch = random_batch(rng, 3, 6, 1500, 7, n_valid=[6, 3, 1])
    loc, logits, boxes, labels, valid = batch
    conf_t = assert_matches_reference(loc, logits, priors, boxes, labels, valid)
    assert (conf_t > 0).sum() > 10  # the comparison covers real work


def test_real_priors_full_size():
    """320 priors (12,810 x 81 classes), batch 2, ~10 boxes: runs and equals the reference,
    including the float32 tie-breaking of the forced matches."""
    cfg = default_config()
    priors = prior_boxes(cfg)
    assert priors.shape == (12810, 4)
    rng = np.random.default_rng(3)
    loc, logits, boxes, labels, valid = random_batch(rng, 2, 12, 12810, 81, n_valid=[10, 9])
    # Small boxes lie inside several same-area priors, so their forced matches are exact
    # IoU ties broken by float32 rounding: for these four, float64 picks another prior.
    tied = np.array(
        [
            [0.074, 0.156, 0.111, 0.184],
            [0.165, 0.663, 0.182, 0.670],
            [0.336, 0.178, 0.388, 0.183],
            [0.765, 0.107, 0.803, 0.113],
        ],
        F32,
    )
    boxes[:, :2] = tied.reshape(2, 2, 4)
    pf = np_point_form(priors)
    f32_best = np_iou(tied, pf).argmax(1)
    assert (f32_best != np_iou(tied.astype(np.float64), pf.astype(np.float64)).argmax(1)).all()
    conf_t = assert_matches_reference(loc, logits, priors, boxes, labels, valid)
    assert (conf_t.reshape(-1)[f32_best + np.array([0, 0, 1, 1]) * 12810] > 0).all()
    # Matching one image at a time (lax.map) gives the same labels as vmap; the encoded
    # targets only differ by XLA's rounding of a differently fused encode.
    a = match_jit(priors, boxes, labels, valid)
    b = match_jit(priors, boxes, labels, valid, batch_size=1)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-6)


def test_gt_equal_to_prior():
    priors = np.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.1]], F32)
    boxes = np.array([[[0.55, 0.55, 0.85, 0.65]]], F32)  # point form of prior 2
    labels = np.array([[4]], np.int32)
    valid = np.array([[True]])
    loc_t, conf_t = match_jit(priors, boxes, labels, valid)
    np.testing.assert_array_equal(np.asarray(conf_t), [[0, 0, 4]])
    np.testing.assert_allclose(np.asarray(loc_t)[0, 2], 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(loc_t)[0, :2], 0.0)


def test_two_gts_sharing_best_prior_later_wins():
    # Prior 0 is the best prior of both GTs (and under the 0.5 threshold for both):
    # force-matching assigns it to the later GT. Prior 1 is far from both.
    priors = np.array([[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]], F32)
    gt_a = [0.3, 0.3, 0.5, 0.5]  # IoU 0.25 with prior 0
    gt_b = [0.45, 0.45, 0.6, 0.6]  # IoU ~0.14 with prior 0
    boxes = np.array([[gt_a, gt_b], [gt_b, gt_a]], F32)
    labels = np.array([[3, 5], [5, 3]], np.int32)
    valid = np.ones((2, 2), bool)
    loc_t, conf_t = match_jit(priors, boxes, labels, valid)
    np.testing.assert_array_equal(np.asarray(conf_t), [[5, 0], [3, 0]])
    ref = np_encode(np.array([gt_b], F32), priors[:1])
    np.testing.assert_allclose(np.asarray(loc_t)[0, 0], ref[0], rtol=1e-6)
    # A padded GT (even the later one, even a perfect fit) never takes a prior.
    valid = np.array([[True, False], [False, True]])
    _, conf_t = match_jit(priors, boxes, labels, valid)
    np.testing.assert_array_equal(np.asarray(conf_t), [[3, 0], [3, 0]])
    boxes_pad = boxes.copy()
    boxes_pad[0, 1] = [0.3, 0.3, 0.7, 0.7]  # == prior 0, but padded
    _, conf_t = match_jit(priors, boxes_pad, labels, valid)
    np.testing.assert_array_equal(np.asarray(conf_t)[0], [3, 0])


def test_image_without_boxes():
    rng = np.random.default_rng(5)
    priors = random_priors(rng, 400)
    loc, logits, boxes, labels, valid = random_batch(rng, 2, 4, 400, 5, n_valid=[3, 0])
    _, conf_t = match_jit(priors, boxes, labels, valid)
    assert not np.asarray(conf_t)[1].any()
    both = loss_and_grad(loc, logits, priors, boxes, labels, valid)
    alone = loss_and_grad(loc[:1], logits[:1], priors, boxes[:1], labels[:1], valid[:1])
    assert all(np.isfinite(v).all() for v in both)
    # No positives and no mined negatives: image 1 adds nothing, and gets no gradient.
    np.testing.assert_allclose(both[:2], alone[:2], rtol=1e-6)
    assert not both[2][1].any() and not both[3][1].any()
    np.testing.assert_allclose(both[3][0], alone[3][0], atol=1e-8)


def test_all_padded_batch():
    rng = np.random.default_rng(6)
    priors = random_priors(rng, 300)
    loc, logits, boxes, labels, valid = random_batch(rng, 2, 3, 300, 4, n_valid=[0, 0])
    boxes[:] = 0.0  # all-zero padding, as a data pipeline writes it (log 0 in encode)
    ll, lc, gl, gc = loss_and_grad(loc, logits, priors, boxes, labels, valid)
    assert ll == 0.0 and lc == 0.0
    assert np.isfinite(gl).all() and np.isfinite(gc).all()
    assert not gl.any() and not gc.any()


def test_hard_negative_ties_are_stable():
    mining = jnp.array([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    neg = hard_negatives(mining, jnp.array([2, 3]))
    np.testing.assert_array_equal(np.asarray(neg), [[0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_jit_equals_no_jit():
    rng = np.random.default_rng(7)
    priors = random_priors(rng, 500)
    batch = random_batch(rng, 2, 5, 500, 6)
    loc, logits, boxes, labels, valid = batch
    jitted = loss_and_grad(loc, logits, priors, boxes, labels, valid, jit=True)
    with jax.disable_jit():
        eager = loss_and_grad(loc, logits, priors, boxes, labels, valid, jit=False)
    np.testing.assert_allclose(jitted[:2], eager[:2], rtol=1e-6)
    np.testing.assert_allclose(jitted[2], eager[2], atol=1e-7)
    np.testing.assert_allclose(jitted[3], eager[3], atol=1e-7)


def test_low_precision_inputs_and_config():
    """bf16 network outputs are promoted to float32; neg_pos and the threshold are read
    from the config."""
    rng = np.random.default_rng(8)
    priors = random_priors(rng, 300)
    loc, logits, boxes, labels, valid = random_batch(rng, 2, 4, 300, 5)
    cfg = default_config()
    cfg.loss.neg_pos = 1
    cfg.loss.overlap_thresh = 0.3
    fn = jax.jit(lambda lc, lg: multibox_loss(lc, lg, priors, boxes, labels, valid, cfg))
    a = fn(jnp.asarray(loc, jnp.bfloat16), jnp.asarray(logits, jnp.bfloat16))
    assert all(v.dtype == jnp.float32 for v in a)
    lb = np.asarray(jnp.asarray(loc, jnp.bfloat16), F32)
    gb = np.asarray(jnp.asarray(logits, jnp.bfloat16), F32)
    ref = np_multibox(lb, gb, priors, boxes, labels, valid, thresh=0.3, neg_pos=1)
    np.testing.assert_allclose([float(v) for v in a], ref[:2], rtol=1e-5)
