"""`m2det_jax.voc_eval`: against a plain per-detection loop written from the definition
(as the original's voc_eval.py loops), and hand-computed cases."""

import numpy as np
import pytest

from m2det_jax.evaluation.voc import voc_ap, voc_evaluate

NAMES = ["cat", "dog", "bird"]


def _reference(gt, dets, label, use_07, thr=0.5):
    """One class, detection by detection (the original's structure)."""
    recs = {}
    npos = 0
    for k, g in gt.items():
        m = np.asarray(g["labels"]) == label
        d = np.asarray(g["difficult"], bool)[m]
        recs[k] = {"bbox": np.asarray(g["boxes"], float).reshape(-1, 4)[m], "difficult": d,
                   "det": [False] * int(m.sum())}  # fmt: skip
        npos += int((~d).sum())
    ids, conf, bb = [], [], []
    for k, d in dets.items():
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            if lab == label:
                ids.append(k)
                conf.append(s)
                bb.append(b)
    order = np.argsort(-np.asarray(conf), kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for n, i in enumerate(order):
        r, b = recs[ids[i]], np.asarray(bb[i], float)
        ovmax, jmax = -np.inf, -1
        if len(r["bbox"]):
            g = r["bbox"]
            iw = np.maximum(np.minimum(g[:, 2], b[2]) - np.maximum(g[:, 0], b[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(g[:, 3], b[3]) - np.maximum(g[:, 1], b[1]) + 1.0, 0.0)
            inter = iw * ih
            uni = ((b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
                   + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inter)  # fmt: skip
            ov = inter / uni
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > thr:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[n] = 1.0
                    r["det"][jmax] = True
                else:
                    fp[n] = 1.0
        else:
            fp[n] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _random_set(seed, num_images=30):
    rng = np.random.default_rng(seed)
    gt, dets = {}, {}
    for k in range(num_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(10, 150, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).round()
        labels = rng.integers(1, 4, n)
        gt[k] = {"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2}
        # detections: jittered copies (some twice: duplicates), plus random boxes
        idx = np.repeat(np.arange(n), rng.integers(0, 3, n))
        copies, clabels = boxes[idx] + rng.normal(0, 8, (len(idx), 4)), labels[idx]
        m = int(rng.integers(0, 5))
        rxy = rng.uniform(0, 300, (m, 2))
        rand = np.concatenate([rxy, rxy + rng.uniform(10, 150, (m, 2))], 1)
        dets[k] = {"boxes": np.concatenate([copies, rand]),
                   "scores": rng.random(len(idx) + m).round(2),  # ties included
                   "labels": np.concatenate([clabels, rng.integers(1, 4, m)])}  # fmt: skip
    return gt, dets


@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_per_detection_reference(seed, use_07):
    gt, dets = _random_set(seed)
    m = voc_evaluate(gt, dets, NAMES, use_07_metric=use_07)
    want = [_reference(gt, dets, label, use_07) for label in (1, 2, 3)]
    for name, w in zip(NAMES, want, strict=True):
        assert m[f"AP/{name}"] == pytest.approx(w, abs=1e-12)
        assert 0.0 < w < 1.0  # a non-trivial case
    assert m["mAP"] == pytest.approx(np.mean(want), abs=1e-12)


def test_07_and_auc_differ_and_hand_computed():
    # precision 1 at recall 0.5, then 0.5 at recall 1: 11-point AP = (6 x 1 + 5 x 2/3)/11
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(rec, prec, False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_perfect_detector_duplicates_and_difficult_only_images():
    box = np.array([[10.0, 10.0, 50.0, 60.0]])
    gt = {1: {"boxes": box, "labels": [1], "difficult": [False]},
          2: {"boxes": box, "labels": [2], "difficult": [True]}}  # fmt: skip
    perfect = {1: {"boxes": box, "scores": [0.9], "labels": [1]}}
    m = voc_evaluate(gt, perfect, ["background", *NAMES])
    assert m["AP/cat"] == pytest.approx(1.0) and m["mAP"] == pytest.approx(1.0)
    assert m["AP/dog"] == -1.0 and m["AP/bird"] == -1.0  # no non-difficult box: not in mAP
    # a detection of the difficult box is ignored: neither true nor false positive
    with_difficult = {**perfect, 2: {"boxes": box, "scores": [0.99], "labels": [2]}}
    assert voc_evaluate(gt, with_difficult, NAMES)["AP/cat"] == pytest.approx(1.0)
    # a duplicate (lower score) is a false positive: precision 1/2 at recall 1
    dup = {1: {"boxes": np.concatenate([box, box + 1]), "scores": [0.9, 0.8], "labels": [1, 1]}}
    assert voc_evaluate(gt, dup, NAMES, use_07_metric=False)["AP/cat"] == 1.0
    dup_first = {1: {"boxes": np.concatenate([box + 30, box]), "scores": [0.9, 0.8],
                     "labels": [1, 1]}}  # fmt: skip
    # the false positive comes first: precision 1/2 at recall 1 -> AUC 0.5
    assert voc_evaluate(gt, dup_first, NAMES, use_07_metric=False)["AP/cat"] == 0.5
    # already matched box taken by a better-overlapping second detection: FP even though
    # another box overlaps it too
    two = {1: {"boxes": np.array([[10.0, 10, 50, 60], [100, 100, 140, 150]]),
               "labels": [1, 1], "difficult": [False, False]}}  # fmt: skip
    d = {1: {"boxes": np.array([[10.0, 10, 50, 60], [12, 12, 52, 62]]), "scores": [0.9, 0.8],
             "labels": [1, 1]}}  # fmt: skip
    r = voc_evaluate(two, d, NAMES, use_07_metric=False)
    assert r["AP/cat"] == pytest.approx(0.5)  # recall 1/2 at precision 1, then only a FP
    # no detections at all: AP 0
    assert voc_evaluate(gt, {}, NAMES)["AP/cat"] == 0.0


def test_bad_inputs_are_named():
    gt = {1: {"boxes": [[0, 0, 1, 1]], "labels": [1], "difficult": [False]}}
    with pytest.raises(ValueError, match=r"detections\[7\]: image id not in ground_truth"):
        voc_evaluate(gt, {7: {"boxes": [], "scores": [], "labels": []}}, NAMES)
    with pytest.raises(ValueError, match="label 4 outside 1..3"):
        voc_evaluate({1: {"boxes": [[0, 0, 1, 1]], "labels": [4], "difficult": [0]}}, {}, NAMES)
    with pytest.raises(ValueError, match="missing 'difficult'"):
        voc_evaluate({1: {"boxes": [[0, 0, 1, 1]], "labels": [1]}}, {}, NAMES)
