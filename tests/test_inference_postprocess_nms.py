"""nms(): detect's per-class NMS and per-image cap on decoded boxes and probabilities.

`nms(*decode_and_score(loc, logits, priors, cfg, hw), cfg)` is `detect(loc, logits,
priors, cfg, hw)`: the same valid rows and classes; boxes and scores to float32 rounding
(detect's sparse layouts decode and soft-max gathered priors, see the package docstring).
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference import postprocess as pp
from tests.postprocess_reference import CASES, F32, case_81_classes, clustered_case, make_cfg

EXACT = ("classes", "valid", "num_dropped", "num_tie_dropped")


def assert_same_rows(got, want):
    assert want["valid"].any()
    for k in EXACT:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6, atol=0)


def tree_np(x):
    return jax.tree.map(np.asarray, x)


@pytest.mark.parametrize("method,offset,max_per_image", CASES)
def test_nms_of_decoded_boxes_equals_detect(method, offset, max_per_image):
    """On random clustered inputs (exact ties included), every method, with and without
    max_per_image: nms of normalized boxes scaled by image_sizes = detect."""
    rng = np.random.default_rng(10 + CASES.index((method, offset, max_per_image)))
    loc, logits, priors = clustered_case(rng, 3, 400, 5)
    hw = np.array([[375, 500], [480, 640], [128, 96]], F32)
    cfg = make_cfg(method=method, pixel_offset=offset, max_per_image=max_per_image,
                   iou_threshold=0.45 if method == "hard" else 0.3)  # fmt: skip
    want = tree_np(pp.detect(loc, logits, priors, cfg, hw))
    got = tree_np(pp.nms(*pp.decode_and_score(loc, logits, priors, cfg), cfg, hw))
    assert_same_rows(got, want)


def test_nms_of_pixel_or_normalized_boxes():
    """nms with image_sizes = nms of boxes scaled beforehand (box_ops.scale_xyxy), bit for
    bit; without image sizes, normalized boxes in and out, as detect; make_nms_fn is
    cached per setting."""
    rng = np.random.default_rng(31)
    loc, logits, priors = clustered_case(rng, 2, 300, 4)
    cfg = make_cfg()
    hw = np.array([[375, 500], [480, 640]], F32)
    boxes, scores = pp.decode_and_score(loc, logits, priors, cfg)
    boxes_px, _ = pp.decode_and_score(loc, logits, priors, cfg, hw)
    fn = pp.make_nms_fn(cfg)
    assert pp.make_nms_fn(make_cfg()) is fn
    a, b = tree_np(fn(boxes, scores, hw)), tree_np(fn(boxes_px, scores))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["valid"].any()
    want = tree_np(pp.detect(loc, logits, priors, cfg))
    assert_same_rows(tree_np(fn(boxes, scores)), want)
    assert np.abs(want["boxes"]).max() < 3


def test_nms_equals_detect_on_81_classes():
    """Full-size priors (12,810) and 81 classes: a typical image (detect runs a sparse
    layout) and a crowded one (all priors)."""
    cfg = make_cfg()
    priors = prior_boxes(cfg)
    loc, logits, hw = case_81_classes(priors, np.random.default_rng(7))
    for b in range(2):  # one image at a time: test_81_classes_full_size_priors's shapes
        want = tree_np(pp.detect(loc[b : b + 1], logits[b : b + 1], priors, cfg, hw))
        boxes, scores = pp.decode_and_score(loc[b : b + 1], logits[b : b + 1], priors, cfg)
        assert_same_rows(tree_np(pp.nms(boxes, scores, cfg, hw)), want)


def test_nms_rejects_mismatched_shapes():
    cfg = make_cfg()
    with pytest.raises(ValueError, match="boxes"):
        pp.nms(np.zeros((1, 5, 4), F32), np.zeros((1, 6, 3), F32), cfg)
    with pytest.raises(ValueError, match="image_sizes"):
        pp.nms(np.zeros((2, 5, 4), F32), np.zeros((2, 5, 3), F32), cfg, np.ones((1, 2), F32))


def test_jit_and_batch_sharding(tmp_path):
    """Under an outer jit, with the batch sharded over 4 (fake CPU) devices, detect and
    nms give the single-device result."""
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
        boxes, scores = pp.decode_and_score(loc, logits, priors, cfg)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sh = NamedSharding(mesh, P("batch"))
        det, nms = pp.make_detect_fn(cfg), pp.make_nms_fn(cfg)
        runs = (
            (pp.detect(loc, logits, priors, cfg, hw), jax.jit(lambda l, g, hw: det(l, g, priors, hw)),
             (loc, logits, hw)),
            (pp.nms(boxes, scores, cfg, hw), jax.jit(lambda b, s, hw: nms(b, s, hw)),
             (boxes, scores, hw)),
        )
        for ref, f, args in runs:
            ref = jax.tree.map(np.asarray, ref)
            out = f(*(jax.device_put(a, sh) for a in args))
            assert out["boxes"].sharding.spec[0] == "batch", out["boxes"].sharding
            out = jax.tree.map(np.asarray, out)
            # another XLA program: decode may round differently in the last bit
            for k in ("valid", "classes", "num_dropped", "num_tie_dropped"):
                np.testing.assert_array_equal(out[k], ref[k])
            np.testing.assert_allclose(out["boxes"], ref["boxes"], rtol=0, atol=1e-3)
            np.testing.assert_allclose(out["scores"], ref["scores"], rtol=0, atol=1e-6)
            assert ref["valid"].any()
        print("OK", len(jax.devices()))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("OK 4"), p.stdout
