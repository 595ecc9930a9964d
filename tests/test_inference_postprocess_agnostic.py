"""Class-agnostic NMS and the class filter (`postprocess.agnostic`) against a numpy
reference: every prior's best class, one C-order soft-NMS / greedy NMS per image
(`tests.postprocess_reference`'s loops), the class carried with its box."""

import jax
import numpy as np
import pytest

from m2det_jax.config import apply_overrides, default_config, validate
from m2det_jax.inference import postprocess as pp
from tests.postprocess_reference import (
    CASES,
    F32,
    clustered_case,
    cpu_soft_nms_ref,
    greedy_nms_ref,
    make_cfg,
)


def agnostic_ref(boxes, scores, p, classes=()):
    """One image: rows [n, 5] and their classes, as `class_rows` specifies."""
    scores = scores.copy()
    if classes:
        drop = np.setdiff1d(np.arange(1, scores.shape[1]), classes)
        scores[:, drop] = 0
    fg = scores[:, 1:]
    best, cls = fg.max(1), fg.argmax(1) + 1
    inds = np.where(best > F32(p.score_threshold))[0]
    dropped = np.bincount(cls[inds], minlength=scores.shape[1])
    if len(inds) > p.candidates_per_class:
        top = np.argsort(-best[inds], kind="stable")[: p.candidates_per_class]
        inds = np.sort(inds[top])
    dropped -= np.bincount(cls[inds], minlength=scores.shape[1])
    steps = p.max_per_image if p.max_per_image > 0 else p.keep_per_class
    dets = np.hstack((boxes[inds], best[inds][:, None])).astype(F32)
    label = {tuple(d[:4]): c for d, c in zip(dets, cls[inds], strict=True)}
    assert len(label) == len(dets), "the reference needs distinct boxes"
    if p.method == "hard":
        keep = greedy_nms_ref(dets, p.iou_threshold, p.pixel_offset, steps)
    else:
        m = 1 if p.method == "soft_linear" else 2
        keep = cpu_soft_nms_ref(dets, p.sigma, p.iou_threshold, p.min_score, m,
                                p.pixel_offset, steps)  # fmt: skip
    rows = dets[keep[:steps]]
    return rows, np.array([label[tuple(r[:4])] for r in rows], np.int32), dropped


def check(out, refs, p):
    steps = p.max_per_image if p.max_per_image > 0 else p.keep_per_class
    assert out["scores"].shape == (len(refs), steps)
    for b, (rows, cls, dropped) in enumerate(refs):
        v = out["valid"][b]
        assert v.sum() == len(rows) and v[: len(rows)].all()
        np.testing.assert_array_equal(out["classes"][b][v], cls)
        np.testing.assert_allclose(out["boxes"][b][v], rows[:, :4], atol=1e-3, rtol=0)
        np.testing.assert_allclose(out["scores"][b][v], rows[:, 4], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(out["num_dropped"][b], dropped)
        assert (out["scores"][b][~v] == 0).all() and (out["classes"][b][~v] == 1).all()
        assert (np.diff(out["scores"][b][v]) <= 0).all()  # selection order = score order


def run(loc, logits, priors, cfg, hw, classes=()):
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, cfg, hw))
    boxes, scores = map(np.asarray, pp.decode_and_score(loc, logits, priors, cfg, hw))
    refs = [agnostic_ref(boxes[b], scores[b], cfg.postprocess, classes) for b in range(len(loc))]
    return out, refs, (boxes, scores)


# Each method, with and without the per-image cap (a subset of CASES: compiles dominate).
AGNOSTIC_CASES = [CASES[0], CASES[2], CASES[4], CASES[5]]


@pytest.mark.parametrize("method,offset,max_per_image", AGNOSTIC_CASES)
def test_class_agnostic_matches_the_reference(method, offset, max_per_image):
    """detect and nms (fast and plain paths alike) = the reference, every method, with
    and without max_per_image; rows carry their classes; one box holds one class."""
    rng = np.random.default_rng(40 + CASES.index((method, offset, max_per_image)))
    loc, logits, priors = clustered_case(rng, 2, 400, 6, dup_frac=0.0)
    hw = np.array([[375, 500], [480, 640]], F32)
    cfg = make_cfg(method=method, pixel_offset=offset, max_per_image=max_per_image,
                   class_agnostic=True, iou_threshold=0.45 if method == "hard" else 0.3)
    out, refs, (boxes, scores) = run(loc, logits, priors, cfg, hw)
    check(out, refs, cfg.postprocess)
    assert len({c for _, cls, _ in refs for c in cls}) > 1  # several classes compete
    if max_per_image == 0:  # (both capped at 40 otherwise)
        per_class = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(
            method=method, pixel_offset=offset), hw))
        assert out["valid"].sum() < per_class["valid"].sum()  # cross-class suppression
    if (method, offset, max_per_image) != CASES[0]:
        return  # the nms entry point: once
    norm_boxes, _ = pp.decode_and_score(loc, logits, priors, cfg)
    via_nms = jax.tree.map(np.asarray, pp.nms(norm_boxes, scores, cfg, hw))
    np.testing.assert_array_equal(via_nms["classes"], out["classes"])
    np.testing.assert_array_equal(via_nms["valid"], out["valid"])
    np.testing.assert_allclose(via_nms["scores"], out["scores"], atol=1e-6, rtol=0)


def test_class_agnostic_counts_what_the_cap_drops():
    rng = np.random.default_rng(5)
    loc, logits, priors = clustered_case(rng, 2, 300, 4, dup_frac=0.0)
    cfg = make_cfg(class_agnostic=True, candidates_per_class=20)
    out, refs, _ = run(loc, logits, priors, cfg, None)
    check(out, refs, cfg.postprocess)
    assert out["num_dropped"].sum() > 0 and out["num_dropped"][:, 0].sum() == 0


@pytest.mark.parametrize("agnostic", [False, True])
def test_class_filter_acts_before_nms(agnostic):
    """Only the listed classes become candidates: per class, their rows are what the
    unfiltered NMS gives them (max_per_image 0); class-agnostic, the other classes no
    longer suppress them (the reference with the other classes zeroed)."""
    rng = np.random.default_rng(6)
    loc, logits, priors = clustered_case(rng, 2, 300, 5, dup_frac=0.0)
    hw = np.array([[300, 400], [200, 200]], F32)
    cfg = make_cfg(class_agnostic=agnostic, classes=(2, 4))
    out = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, cfg, hw))
    assert out["valid"].any() and set(out["classes"][out["valid"]]) <= {2, 4}
    if agnostic:
        _, refs, _ = run(loc, logits, priors, cfg, hw, classes=(2, 4))
        check(out, refs, cfg.postprocess)
        everything = jax.tree.map(np.asarray, pp.detect(loc, logits, priors,
                                                        make_cfg(class_agnostic=True), hw))
        kept = everything["valid"] & np.isin(everything["classes"], (2, 4))
        assert out["valid"].sum() > kept.sum()  # rows the other classes suppressed before
    else:
        full = jax.tree.map(np.asarray, pp.detect(loc, logits, priors, make_cfg(), hw))
        mask = np.isin(full["classes"], (2, 4))
        for k in ("boxes", "scores", "valid"):
            np.testing.assert_array_equal(out[k][:, mask[0]], full[k][:, mask[0]], err_msg=k)
        assert not out["valid"][:, ~mask[0]].any()


def test_class_settings_are_validated():
    cfg = default_config()
    apply_overrides(cfg, ["postprocess.classes=3", "postprocess.class_agnostic=true"])
    assert cfg.postprocess.classes == (3,) and cfg.postprocess.class_agnostic is True
    apply_overrides(cfg, ["postprocess.classes=1,5"])
    validate(cfg)
    cfg.postprocess.classes = (0, 2)
    with pytest.raises(ValueError, match=r"postprocess.classes=\(0, 2\): 0 is not a class id"):
        validate(cfg)
    cfg.postprocess.classes = (cfg.model.num_classes,)
    with pytest.raises(ValueError, match="not a class id"):
        validate(cfg)
