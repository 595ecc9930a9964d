"""`m2det export --serving onnx`: the ONNX graph (preprocess + network + decode + softmax)
run by onnxruntime against JAX, the detections with the NMS after it, and the translator's
rules one by one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from m2det_jax import load_config
from m2det_jax.checkpoints.variables import save_variables
from m2det_jax.inference import onnx_export as ox
from m2det_jax.inference.api import with_postprocess
from m2det_jax.models.layers import max_pool, upsample_nearest
from tests.helpers import OVERRIDES, assert_same_detections, config_path, perturbed_variables

pytest.importorskip("onnxruntime")

LABELS = {"class_names": ["a", "b", "c"], "category_ids": [3, 7, 9]}


def test_onnx_export_cli_matches_jax(tmp_path):
    """The exported graph's boxes and scores = JAX's (`onnx_fn`: folded BatchNorm, decode
    and softmax, float32 rounding apart); `OnnxDetector` = `nms` of the graph's output with
    the export's settings, here the run-time ones (--agnostic --classes --max_det)."""
    from m2det_jax.cli import main

    cfg = load_config(config_path("tiny"), OVERRIDES)
    v = perturbed_variables(cfg)
    ckpt = save_variables(tmp_path / "vars", v, cfg, source="test", labels=LABELS)
    out = tmp_path / "export"
    args = ["export", "--config", config_path("tiny"), *("--config." + o for o in OVERRIDES),
            "--checkpoint", str(ckpt), "--output", str(out), "--serving", "onnx",
            "--batch", "2", "--agnostic", "--classes", "a,c", "--max_det", "7"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((out / "serving.json").read_text())
    assert meta["format"] == "onnx" and meta["batch"] == "2" and meta["onnx"]["opset"] == 17
    assert meta["postprocess"]["class_agnostic"] and meta["postprocess"]["classes"] == [1, 3]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 64, 3), np.uint8)
    hw = np.array([[100, 200], [30, 41]], np.float32)
    boxes, scores = ox.onnx_session(out / ox.ONNX_FILE).run(
        None, {"images": images, "image_sizes": hw})
    want_boxes, want_scores = map(np.asarray, jax.jit(ox.onnx_fn(cfg, v))(images, hw))
    np.testing.assert_allclose(boxes, want_boxes, atol=2e-3, rtol=1e-5)
    # Softmax of logits in the thousands (the test weights are peaky on purpose): a 1e-6
    # relative logit difference (float32 summation order) moves a mixed score by ~1e-3.
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)
    run_cfg = with_postprocess(cfg, classes=(1, 3), max_det=7, agnostic=True)
    got = ox.OnnxDetector(load_config(str(out / "config.json")), out / ox.ONNX_FILE)(images, hw)
    # The detector = nms with the export's settings on the graph's own output (exact).
    want = jax.device_get(ox.make_nms_fn(run_cfg)(boxes, scores))
    assert got["scores"].shape == (2, 7)
    assert set(got["classes"][got["valid"]]) <= {1, 3}
    assert_same_detections(got, want, box_atol=0, score_atol=0)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ox.onnx_session(out / ox.ONNX_FILE).run(None, {"images": images[:1], "image_sizes": hw[:1]})


class _Probe(nn.Module):
    """One of each layer kind the translator has a rule for."""

    @nn.compact
    def __call__(self, x):
        x = x[..., ::-1]  # rev
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=((1, 0), (0, 1)))(x))
        y = nn.Conv(6, (3, 3), padding=2, feature_group_count=3, kernel_dilation=2)(x)
        x = max_pool(x + y, 3, 1, padding=1)
        a, b = jnp.split(x, 2, axis=-1)
        x = jnp.concatenate([upsample_nearest(a, (10, 10)), upsample_nearest(b, (10, 10))], -1)
        w = jnp.mean(x, axis=(1, 2), keepdims=True)
        w = nn.sigmoid(nn.Dense(6)(w))
        x = x * w / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
        z = jnp.stack([x.max(axis=(1, 2)), jnp.exp(-x.min(axis=(1, 2)))], axis=1)
        return jnp.clip(z, 0.01, 0.9), jnp.where(x > 0.1, x, -x) ** 3


def test_translator_rules_match_jax(tmp_path):
    probe = _Probe()
    x = np.random.default_rng(2).normal(0, 1, (2, 11, 13, 3)).astype(np.float32)
    v = probe.init(jax.random.key(0), x)
    fn = lambda x: probe.apply(v, x)  # noqa: E731
    model = ox.jaxpr_to_onnx(fn, [jax.ShapeDtypeStruct(x.shape, x.dtype)], ["x"], ["z", "y"])
    import onnx

    onnx.checker.check_model(model)
    path = tmp_path / "probe.onnx"
    path.write_bytes(model.SerializeToString())
    got = ox.onnx_session(path).run(None, {"x": x})
    want = jax.jit(fn)(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, np.asarray(w), atol=1e-5, rtol=1e-5)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "MaxPool", "Gather", "Einsum", "Split", "Sigmoid", "Where"} <= ops


def test_unsupported_primitive_is_named():
    with pytest.raises(ox.UnsupportedPrimitiveError, match="'sort'"):
        ox.jaxpr_to_onnx(jnp.sort, [jax.ShapeDtypeStruct((5,), jnp.float32)], ["x"], ["y"])
