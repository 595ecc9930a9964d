"""The numpy reference of the original's post-processing and the shared test helpers of
tests/test_inference_postprocess_*.py (checks of the reference itself: test_inference_postprocess_reference.py).

The reference is written from the description of the original code: a per-class Python
loop over float32 numpy arrays, the C soft-NMS loop transcribed statement by statement
(scalar float32 arithmetic, in-place swaps, swap-with-last removal, the `range(N)` bound
evaluated once), greedy hard NMS with '>' suppression in numpy's `argsort()[::-1]` order,
and the max_per_image `>=` rule. It is fed the boxes/scores of `decode_and_score` (the
same arrays `detect` builds), so NMS decisions can be compared exactly: per-class counts
and order exact, boxes within 1e-3 px, scores within 1e-6.
"""

import jax
import numpy as np

from m2det_jax.config import default_config
from m2det_jax.inference import postprocess as pp

F32 = np.float32

# The settings every method-level test runs: method, pixel_offset, max_per_image.
CASES = [
    ("soft_linear", 1, 0),  # the original
    ("soft_linear", 0, 40),
    ("soft_gaussian", 1, 40),
    ("soft_gaussian", 0, 0),
    ("hard", 1, 0),
    ("hard", 0, 40),
]


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
    """gpu_nms / cpu_nms: numpy's `scores.argsort()[::-1]` order (a stable ascending sort,
    reversed: among equal scores the later row first), suppress IoU > thresh."""
    one, thresh = F32(offset), F32(thresh)
    order = np.argsort(dets[:, 4], kind="stable")[::-1]
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
    """detect's output and the reference's, fed decode_and_score's boxes / scores."""
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


def case_81_classes(priors, rng):
    """Full-size priors and 81 classes: image 0 typical (a few small objects: a sparse
    layout), image 1 crowded (candidates in most classes: all priors) -> loc, logits, hw."""
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
    return loc, logits, np.array([[480, 640]], F32)
