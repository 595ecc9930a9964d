"""Speed: inference as the paper reports it, throughput, post-processing alone, the
forward pass and the machine's matmul peak.

The paper (M2Det, Table 1 "Time") times one image at a time, network + NMS, on a Titan X;
`run_benchmark` measures the same protocol here (batch 1, the whole jitted
`inference.make_predict_fn`, mean over `iters` calls after a warm-up), the throughput of
batched inference, and `postprocess.detect` alone for the original-compatible settings of
the config and for `standard_postprocess(cfg)`. Compilation is timed separately and never
counted in the per-image numbers. Without a checkpoint the weights are random (the
post-processing time then depends on how many random scores pass the threshold).

`forward_speed` times the network alone (median of `iters` calls) with its conv GFLOP/s,
and `peak_gflops` measures the machine's float32 matmul throughput, the denominator of
the efficiency that `m2det verify` and `benchmarks/forward.py` print.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2det_jax.core.preprocess import preprocess
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.postprocess import make_detect_fn, standard_postprocess
from m2det_jax.inference.predict import make_predict_fn
from m2det_jax.inference.variables import prepare_variables
from m2det_jax.models import apply_inference, build_model
from m2det_jax.models.winograd import WINOGRAD
from m2det_jax.perf import runtime
from m2det_jax.perf.stats import count_macs


def _timed(fn, args, iters: int) -> tuple[float, float]:
    """(compile seconds, mean seconds per call over `iters` calls after one warm-up)."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    t = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(compiled(*args))
    return compile_s, (time.perf_counter() - t) / max(iters, 1)


def _images(cfg, batch: int, seed: int = 0) -> jnp.ndarray:
    """Random uint8 RGB images [batch, S, S, 3] (what `make_predict_fn` takes)."""
    s = cfg.model.input_size
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, s, s, 3), np.uint8))


def run_benchmark(
    cfg: ml_collections.ConfigDict, variables=None, *, batch: int = 8, iters: int = 20
) -> dict[str, Any]:
    """Times inference of `cfg` (random weights when `variables` is None).

    Returns:
      dict with input_size, batch, iters, random_weights, device and per measurement
      {"compile_s", "s_per_img", ...}: "paper" (batch 1 net + NMS, with "fps"),
      "throughput" (batch `batch`, with "img_per_s"), "postprocess_original" and
      "postprocess_standard" (detect alone, batch 1, with "detections").
    """
    model = build_model(cfg)
    x1 = preprocess(_images(cfg, 1), cfg)
    random_weights = variables is None
    if variables is None:
        variables = jax.jit(model.init)(jax.random.key(0), x1)
    # As evaluation and `m2det detect` run (on the device: folding returns numpy).
    variables = jax.device_put(prepare_variables(cfg, variables))
    s = cfg.model.input_size
    out: dict[str, Any] = {
        "winograd": WINOGRAD in variables,
        "input_size": s,
        "batch": batch,
        "iters": iters,
        "random_weights": random_weights,
        "device": jax.devices()[0].device_kind,
        "cpu": runtime.cpu_model(),
    }
    infer = make_predict_fn(cfg)
    sizes1 = jnp.full((1, 2), float(s), jnp.float32)
    c, sec = _timed(infer, (variables, _images(cfg, 1), sizes1), iters)
    out["paper"] = {"compile_s": c, "s_per_img": sec, "fps": 1.0 / sec}

    xb = _images(cfg, batch, seed=1)
    sizes_b = jnp.full((batch, 2), float(s), jnp.float32)
    c, sec = _timed(infer, (variables, xb, sizes_b), max(1, iters // 2))
    out["throughput"] = {"compile_s": c, "s_per_img": sec / batch, "img_per_s": batch / sec}

    net = jax.jit(lambda v, x: apply_inference(model, v, x))
    raw = net(variables, x1)
    priors = jnp.asarray(prior_boxes(cfg))
    for name, c_pp in (("postprocess_original", cfg), ("postprocess_standard",
                                                        standard_postprocess(cfg))):  # fmt: skip
        detect_fn = make_detect_fn(c_pp)
        fn = jax.jit(lambda loc, logits, sizes, f=detect_fn: f(loc, logits, priors, sizes))
        args = (raw["loc"], raw["logits"], sizes1)
        c, sec = _timed(fn, args, iters)
        n = int(np.asarray(fn(*args)["valid"]).sum())
        out[name] = {"compile_s": c, "s_per_img": sec, "detections": n}
    return out


def format_table(r: dict[str, Any]) -> str:
    """The benchmark result as a fixed-width text table."""
    head = f"input {r['input_size']}, {r['device']} ({r['cpu']}), mean of {r['iters']} iters" + (
        ", random weights" if r["random_weights"] else "") + (
        ", Winograd convs" if r["winograd"] else "")  # fmt: skip
    rows = [
        ("measurement", "compile s", "ms / image", "rate"),
        ("paper: batch 1, net + NMS", f"{r['paper']['compile_s']:.1f}",
         f"{1e3 * r['paper']['s_per_img']:.1f}", f"{r['paper']['fps']:.1f} FPS"),
        (f"throughput: batch {r['batch']}", f"{r['throughput']['compile_s']:.1f}",
         f"{1e3 * r['throughput']['s_per_img']:.1f}",
         f"{r['throughput']['img_per_s']:.1f} img/s"),
    ]  # fmt: skip
    for key, label in (("postprocess_original", "postprocess only: original"),
                       ("postprocess_standard", "postprocess only: standard")):  # fmt: skip
        p = r[key]
        rows.append((label, f"{p['compile_s']:.1f}", f"{1e3 * p['s_per_img']:.2f}",
                     f"{p['detections']} dets"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head]
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]  # fmt: skip
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def forward_speed(cfg: ml_collections.ConfigDict, variables=None, batch: int = 1,
                  iters: int = 5, inference: bool = False) -> dict[str, Any]:  # fmt: skip
    """Compile time, median seconds per image of the forward pass at `batch` and its conv
    GFLOP/s (2 x MACs of the direct convolutions / time); random weights when `variables`
    is None. `inference=True` times `apply_inference` on `prepare_variables(cfg, ...)` (what
    evaluation and `m2det detect` run: folded BN / Winograd as cfg.eval says) instead of
    `model.apply`."""
    model = build_model(cfg)
    s = cfg.model.input_size
    x = preprocess(_images(cfg, batch), cfg)
    if variables is None:
        variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    plain = variables
    if inference:
        variables = jax.device_put(prepare_variables(cfg, variables))
    fwd = jax.jit(lambda v, x: apply_inference(model, v, x))
    t = time.perf_counter()
    compiled = fwd.lower(variables, x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(variables, x))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    macs = count_macs(model, plain, s, batch)
    return {"input_size": s, "batch": batch, "compile_s": compile_s, "s_per_img": sec / batch,
            "gflops": 2 * macs / sec / 1e9}  # fmt: skip


def peak_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """The best float32 n x n matmul throughput (XLA) over `seconds`, in GFLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best
