"""Winograd F(4x4, 3x3) inference convolutions (`models.winograd`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax.config import load_config
from m2det_jax.inference.variables import prepare_variables, use_winograd
from m2det_jax.models import apply_inference, build_model, fold_batchnorm, prepare_winograd
from m2det_jax.models.winograd import WINOGRAD, plan, winograd_conv, winograd_kernel
from tests.helpers import OVERRIDES, config_path, perturbed_variables

LOW = ["eval.winograd=on", "eval.winograd_min_channels=8", "eval.winograd_min_pixels=1"]


def _direct(x, w, padding):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), [(padding[0],) * 2, (padding[1],) * 2],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")  # fmt: skip


@pytest.mark.parametrize(("shape", "k", "padding"), [
    ((2, 13, 10, 5), 7, (1, 1)),  # sizes that are not multiples of the 4x4 tile
    ((1, 8, 8, 3), 4, (0, 0)),  # TUM's last encoder: no padding
    ((1, 3, 9, 6), 2, (1, 0)),  # rows and columns padded differently
    ((1, 1, 1, 16), 8, (1, 1)),  # a 1x1 map (only the kernel's centre sees it)
])  # fmt: skip
def test_winograd_conv_equals_direct_conv(shape, k, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, shape).astype(np.float32)
    w = rng.normal(0, 1, (3, 3, shape[-1], k)).astype(np.float32)
    ref = np.asarray(_direct(x, w, padding))
    out = np.asarray(jax.jit(winograd_conv, static_argnums=2)(x, winograd_kernel(w), padding))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # Not a copy of the direct result: a different kernel gives a different answer.
    assert np.abs(out - np.asarray(_direct(x, np.roll(w, 1, axis=2), padding))).max() > 1e-2


def test_winograd_kernel_is_g_g_gt():
    g = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])  # fmt: skip
    w = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32)
    u = np.asarray(winograd_kernel(w))
    assert u.shape == (36, 4, 5) and u.dtype == np.float32
    ref = np.einsum("xi,ijck,yj->xyck", g, w.astype(np.float64), g).reshape(36, 4, 5)
    np.testing.assert_allclose(u, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[3, 3, C, K\]"):
        winograd_kernel(np.zeros((1, 1, 4, 5), np.float32))


def test_plan_takes_only_wide_stride1_3x3_convolutions():
    cfg = load_config(config_path("tiny"), OVERRIDES)
    model = build_model(cfg)
    shape = (1, 64, 64, 3)
    assert plan(model, shape) == []  # tiny: 16-64 channels, below the default 256
    paths = plan(model, shape, min_channels=8, min_pixels=1)
    names = ["/".join(p) for p in paths]
    assert any("tum_0/lateral" in n for n in names)
    assert any(n.startswith("conf_") for n in names)
    # Stride-2 encoder convs never (the last encoder is stride 1, unpadded: it qualifies).
    assert not any("tum_0/encoder_0/" in n for n in names)
    assert "tum_0/encoder_1/conv" in names
    # Thresholds act on channels and pixels.
    wide = plan(model, shape, min_channels=64, min_pixels=1)
    assert set(wide) < set(paths)
    assert len(plan(model, shape, min_channels=8, min_pixels=64)) < len(paths)


def test_winograd_network_equals_direct_and_composes_with_folding():
    cfg = load_config(config_path("tiny"), OVERRIDES + LOW)
    model = build_model(cfg)
    v = perturbed_variables(cfg)
    x = jnp.asarray(np.random.default_rng(2).normal(0, 50, (2, 64, 64, 3)), jnp.float32)
    fn = jax.jit(lambda v, x: apply_inference(model, v, x))
    ref = fn(v, x)
    w = prepare_winograd(model, v, x.shape, min_channels=8, min_pixels=1)
    assert len(jax.tree.leaves(w[WINOGRAD])) > 20
    both = prepare_variables(cfg, v)  # the config route: the same plan
    assert jax.tree.structure(both[WINOGRAD]) == jax.tree.structure(w[WINOGRAD])
    folded = prepare_winograd(model, fold_batchnorm(v), x.shape, min_channels=8, min_pixels=1)
    for variables in (w, folded):
        out = fn(variables, x)
        for key in ("loc", "logits"):
            a, b = np.asarray(ref[key]), np.asarray(out[key])
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())
    # The transformed kernels are what runs: zeroing them changes the outputs.
    broken = {**w, WINOGRAD: jax.tree.map(jnp.zeros_like, w[WINOGRAD])}
    out = fn(broken, x)
    a = np.asarray(ref["logits"])
    assert np.abs(np.asarray(out["logits"]) - a).max() > 1e-2 * np.abs(a).max()
    with pytest.raises(ValueError, match="fold before prepare_winograd"):
        fold_batchnorm(w)


def test_bfloat16_stored_weights_keep_float32_winograd_kernels():
    """`m2det export --bf16` stores bfloat16 weights: the transformed kernels stay float32
    and the network equals the direct convolutions on the same (rounded) weights."""
    cfg = load_config(config_path("tiny"), OVERRIDES + LOW)
    model = build_model(cfg)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), perturbed_variables(cfg, seed=1))
    w = prepare_winograd(model, bf16, (1, 64, 64, 3), min_channels=8, min_pixels=1)
    assert {a.dtype for a in jax.tree.leaves(w[WINOGRAD])} == {jnp.dtype("float32")}
    as32 = lambda t: jax.tree.map(  # noqa: E731 - what the served function does
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, t)
    x = jnp.asarray(np.random.default_rng(3).normal(0, 50, (1, 64, 64, 3)), jnp.float32)
    fn = jax.jit(lambda v, x: apply_inference(model, v, x))
    a, b = np.asarray(fn(as32(bf16), x)["logits"]), np.asarray(fn(as32(w), x)["logits"])
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())


def test_winograd_setting_resolves_and_is_checked():
    base = load_config(config_path("tiny"), OVERRIDES)
    assert base.eval.winograd == "auto"
    assert use_winograd(base) == (jax.default_backend() == "cpu")
    assert not use_winograd(load_config(config_path("tiny"), OVERRIDES + ["eval.winograd=off"]))
    bf16 = load_config(config_path("tiny"), OVERRIDES + ["model.dtype=bfloat16"])
    assert not use_winograd(bf16)  # float32 only under "auto"
    assert WINOGRAD not in prepare_variables(
        load_config(config_path("tiny"), OVERRIDES + ["eval.winograd=off"]), {"params": {}})
    with pytest.raises(ValueError, match="eval.winograd='fast'"):
        load_config(config_path("tiny"), OVERRIDES + ["eval.winograd=fast"])
    with pytest.raises(ValueError, match="eval.winograd_min_pixels=0"):
        load_config(config_path("tiny"), OVERRIDES + ["eval.winograd_min_pixels=0"])
