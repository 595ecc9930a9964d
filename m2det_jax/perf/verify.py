"""`m2det verify`: parity with the official code on the shipped reference, then speed.

The reference (`m2det_jax.reference`) holds the original's input, priors and outputs for
m2det320_vgg with weights that `seeded_weights` regenerates from the key names alone, so
the check needs no download: convert the weights, compare priors (bit-identical) and the
network's outputs (rtol=1e-3, atol=1e-4 * max|ref|), time the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from m2det_jax.checkpoints.torch_convert import convert_torch_state_dict
from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import build_model
from m2det_jax.perf import runtime
from m2det_jax.perf.benchmark import forward_speed, peak_gflops
from m2det_jax.reference import load_fixture, seeded_weights


def verify_reference(cfg: ml_collections.ConfigDict, iters: int = 5,
                     log: Callable[[str], None] = print) -> bool:  # fmt: skip
    """Checks `cfg` (must be m2det320_vgg) against the shipped reference; True on parity.

    Raises:
      ValueError: if `cfg` is not the reference's model.
    """
    if cfg.model.backbone != "vgg16" or cfg.model.input_size != 320 or cfg.model.sfam:
        raise ValueError("the shipped reference is m2det320_vgg: use that config")
    fx = load_fixture()
    t = time.perf_counter()
    variables = convert_torch_state_dict(seeded_weights(fx["keys"]), cfg)
    log(f"converted {len(fx['keys'])} state_dict entries in {time.perf_counter() - t:.2f} s")
    ok = bool(np.array_equal(prior_boxes(cfg), fx["priors"]))
    log(f"priors bit-identical to the original: {ok}")
    model = build_model(cfg)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, fx["input"])
    for name, ref in (("loc", fx["loc"]), ("logits", fx["conf"])):
        got = np.asarray(out[name])
        err = float(np.abs(got - ref).max())
        tol_ok = bool(np.allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max()))
        ok &= tol_ok
        log(f"{name:6s} max|diff| {err:.2e} (max|ref| {np.abs(ref).max():.2f}) "
            f"within rtol=1e-3, atol=1e-4*max|ref|: {tol_ok}")  # fmt: skip
    sp = forward_speed(cfg, variables, iters=iters)
    peak = peak_gflops()
    log(f"forward 320, batch 1: {sp['s_per_img']:.3f} s/img (compile {sp['compile_s']:.1f} s), "
        f"{sp['gflops']:.0f} GFLOP/s = {100 * sp['gflops'] / peak:.0f}% of the measured "
        f"{peak:.0f} GFLOP/s matmul peak ({runtime.cpu_model()})")  # fmt: skip
    log("PARITY OK" if ok else "PARITY FAILED")
    return ok
