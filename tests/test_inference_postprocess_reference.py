"""Checks of the numpy reference itself (tests/postprocess_reference.py)."""

import numpy as np

from m2det_jax.inference import postprocess as pp
from tests.postprocess_reference import (
    F32,
    clustered_case,
    greedy_nms_ref,
    make_cfg,
    nms_process_ref,
)


# ------------------------------------------------------------------ the reference itself
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


def test_greedy_reference_takes_the_later_of_tied_rows():
    """numpy's argsort()[::-1]: among equal scores the later row is taken first, so of two
    overlapping tied boxes the later one survives."""
    dets = np.array([[0, 0, 10, 10, 0.5], [1, 0, 11, 10, 0.5], [50, 50, 60, 60, 0.5],
                     [0, 0, 10, 10, 0.4]], F32)  # fmt: skip
    assert greedy_nms_ref(dets, 0.5, 0) == [2, 1]
