"""Measured cost of one train step, read from the compiled step itself.

`train_step_cost(cfg, per_device_batch)` builds the model, optimizer and train state
abstractly (`jax.eval_shape`, nothing is allocated), lowers and compiles the real jitted
`train.make_train_step` for ONE device at `per_device_batch` images, and the forward pass
alone, and returns what XLA says about them: FLOPs per image (`cost_analysis`), the memory
plan (`memory_analysis`: arguments, outputs, temporaries, aliased = donated bytes) and the
compile time, next to the analytic forward cost (2 x the convolution MACs of
`perf.stats.count_macs`). `time_train_step` also runs the step (random batch) and reports
seconds per step, images/s and the model FLOPs utilisation (MFU) against the device's
dense peak (`PEAK_TFLOPS`, or one the caller gives).

  m2det benchmark --config configs/m2det320_vgg.py --train --batch 16 --no_run
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import build_model
from m2det_jax.perf.runtime import cpu_model
from m2det_jax.perf.stats import count_macs
from m2det_jax.train.meter import (
    compiled_flops,
    math_of,
    model_peak_tflops,
)
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.step import TrainState, make_train_step

# --------------------------------------------------------------------------------------
# Abstract inputs


def batch_spec(cfg, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of the uint8 batch that `train.make_train_step` reads."""
    g = int(cfg.data.max_boxes)
    on_device = bool(cfg.data.augment_on_device)
    side = int(cfg.data.device_canvas) if on_device else int(cfg.model.input_size)
    spec = {
        "image": jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8),
        "boxes": jax.ShapeDtypeStruct((batch, g, 4), jnp.float32),
        "labels": jax.ShapeDtypeStruct((batch, g), jnp.int32),
        "valid": jax.ShapeDtypeStruct((batch, g), jnp.bool_),
        "mask": jax.ShapeDtypeStruct((batch,), jnp.bool_),
    }
    if on_device:
        spec["canvas_sizes"] = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
    return spec


def random_batch(cfg, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch matching `batch_spec`: random uint8 images and up to 3 random valid boxes."""
    spec = batch_spec(cfg, batch)
    rng = np.random.default_rng(seed)
    g = spec["boxes"].shape[1]
    xy = rng.uniform(0, 0.6, (batch, g, 2))
    wh = rng.uniform(0.1, 0.4, (batch, g, 2))
    out = {
        "image": rng.integers(0, 256, spec["image"].shape, np.uint8),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": rng.integers(1, int(cfg.model.num_classes), (batch, g)).astype(np.int32),
        "valid": np.arange(g)[None, :] < rng.integers(1, 4, (batch, 1)),
        "mask": np.ones(batch, bool),
    }
    if "canvas_sizes" in spec:
        side = spec["image"].shape[1]
        out["canvas_sizes"] = np.full((batch, 2), side, np.int32)
    return out


def _on(device, tree):
    """`tree` of ShapeDtypeStructs placed on `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)  # fmt: skip


def _parts(cfg):
    """model, optimizer, schedule, abstract state and the jitted step (state donated)."""
    model = build_model(cfg)
    schedule = learning_rate_schedule(cfg, 1000)
    tx = make_optimizer(cfg, schedule)
    state = jax.eval_shape(lambda r: TrainState.create(model, tx, cfg, r), jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)),
                   donate_argnums=(0,))  # fmt: skip
    return model, tx, schedule, state, step


def held_for_backward_bytes(cfg, batch: int) -> int:
    """Bytes the network's backward pass holds from its forward (train mode) for `batch`
    images: the residuals of `jax.vjp` with respect to the parameters, traced abstractly.

    What `train.remat` changes, independent of any compiler: with "stages" only block
    boundaries are held (each block's insides are recomputed during its backward, so the
    peak adds one block's activations). The parameters are counted (the backward reads
    them); the loss and optimizer are not.
    """
    model = build_model(cfg)
    s = int(cfg.model.input_size)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))
    x = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)

    def backward_fn(params, batch_stats, images):
        def forward(p):
            out, _ = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                 train=True, mutable=["batch_stats"])  # fmt: skip
            return out

        return jax.vjp(forward, params)[1]

    held = jax.eval_shape(backward_fn, v["params"], v["batch_stats"], x)
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(held)))  # fmt: skip


# --------------------------------------------------------------------------------------
# Reading the compiled executables


def _memory(compiled) -> dict[str, int | None]:
    """Bytes of the compiled memory plan; "peak" = argument + output + temp - alias."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    fields = ("argument", "output", "temp", "alias", "generated_code")
    out: dict[str, int | None] = {
        k: (int(getattr(m, f"{k}_size_in_bytes")) if hasattr(m, f"{k}_size_in_bytes")
            else None)
        for k in fields
    }  # fmt: skip
    parts = [out["argument"], out["output"], out["temp"]]
    out["peak"] = (sum(parts) - (out["alias"] or 0)) if None not in parts else None
    return out


def device_peak_bytes(device) -> int | None:
    """The most memory the device has held in this process (`memory_stats()`'s
    peak_bytes_in_use: measured, unlike the compiled plan); None where the backend does not
    say (CPUs)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not implemented on every backend
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def _compile(fn, *args) -> tuple[Any, float, float]:
    """(compiled, lower seconds, compile seconds)."""
    t = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t, time.perf_counter() - t1


def _cost(cfg, per_device_batch: int, device=None, forward: bool = True):
    """(cost dict, compiled step, model, tx) for `cfg` on `device` (default: the first)."""
    device = device or jax.devices()[0]
    b, s = int(per_device_batch), int(cfg.model.input_size)
    model, tx, _, state, step = _parts(cfg)
    state_spec = _on(device, state)
    compiled, lower_s, compile_s = _compile(step, state_spec, _on(device, batch_spec(cfg, b)))
    step_flops = compiled_flops(compiled)
    k = int(cfg.train.grad_accum_steps)
    if step_flops is not None and k > 1:  # XLA counts a scan (while) body once
        step_flops *= k
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    analytic = 2.0 * count_macs(model, variables, s, b) / b
    out: dict[str, Any] = {
        "backbone": str(cfg.model.backbone), "input_size": s, "dtype": str(cfg.model.dtype),
        "batch": b, "device": device.device_kind, "remat": str(cfg.train.remat),
        "grad_accum_steps": k,
        "step_flops_per_image": None if step_flops is None else step_flops / b,
        "analytic_forward_flops_per_image": analytic,
        "lower_s": lower_s, "compile_s": compile_s, "memory": _memory(compiled),
        # One microbatch's: accumulation runs them one after the other.
        "held_for_backward": held_for_backward_bytes(cfg, max(1, b // k)),
    }  # fmt: skip
    ratio = None if step_flops is None else step_flops / b / (3.0 * analytic)
    out["step_over_3x_forward"] = ratio
    if forward:
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
        x = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
        fcomp, _, fcompile_s = _compile(fwd, _on(device, variables), _on(device, x))
        fflops = compiled_flops(fcomp)
        out["forward_flops_per_image"] = None if fflops is None else fflops / b
        out["forward_over_analytic"] = None if fflops is None else fflops / b / analytic
        out["forward_compile_s"] = fcompile_s
        out["step_over_3x_xla_forward"] = (None if fflops is None or step_flops is None
                                           else step_flops / (3.0 * fflops))  # fmt: skip
    return out, compiled, model, tx


def train_step_cost(cfg, per_device_batch: int, *, forward: bool = True) -> dict[str, Any]:
    """Compile-only cost of one train step of `cfg` at `per_device_batch` images on one
    device (the first), nothing allocated.

    Returns:
      dict with backbone, input_size, dtype, batch, device; step_flops_per_image (XLA
      cost_analysis of the whole step: forward, backward, loss, optimizer),
      forward_flops_per_image (the forward alone, train=False), analytic_forward_flops_per_
      image (2 x conv MACs), step_over_3x_forward (step / (3 x analytic forward): ~1 when
      the backward costs twice the forward), forward_over_analytic, step_over_3x_xla_forward
      (the same ratio against the forward's cost_analysis); memory {argument,
      output, temp, alias, generated_code, peak} bytes (None where the backend does not
      say); held_for_backward (`held_for_backward_bytes`, one microbatch); lower_s,
      compile_s, forward_compile_s.
    """
    return _cost(cfg, per_device_batch, forward=forward)[0]


def time_train_step(cfg, per_device_batch: int, iters: int = 10, *,
                    peak_tflops: float | None = None, forward: bool = True,  # noqa: F811
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """`train_step_cost` plus the step run on the first device (a random batch, one
    warm-up, then `iters` timed steps): s_per_step, img_per_s, peak_tflops (given, else
    `model_peak_tflops` for the device, cfg.model.dtype and JAX's matmul precision, None
    when unknown), math (the arithmetic that peak is of: "tf32", "bf16", ...),
    mfu = step_flops_per_image * img_per_s / peak (None without a peak) and
    device_peak_bytes (`device_peak_bytes`: measured, None on CPUs)."""
    device = jax.devices()[0]
    out, compiled, model, tx = _cost(cfg, per_device_batch, device, forward=forward)
    one = jax.sharding.SingleDeviceSharding(device)
    state = jax.jit(lambda r: TrainState.create(model, tx, cfg, r), out_shardings=one)(
        jax.random.key(int(cfg.train.seed))
    )
    batch = jax.device_put(random_batch(cfg, out["batch"], seed), device)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(max(int(iters), 1)):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    sec = (time.perf_counter() - t) / max(int(iters), 1)
    precision = jax.config.jax_default_matmul_precision
    peak = (
        peak_tflops
        if peak_tflops is not None
        else model_peak_tflops(device.device_kind, out["dtype"], precision)
    )
    flops = out["step_flops_per_image"]
    img_s = out["batch"] / sec
    out.update(
        iters=int(iters),
        s_per_step=sec,
        img_per_s=img_s,
        peak_tflops=peak,
        loss=float(metrics["loss"]),
        math=math_of(device.device_kind, out["dtype"], precision),
        device_peak_bytes=device_peak_bytes(device),
        mfu=None if peak is None or flops is None else flops * img_s / (peak * 1e12),
    )
    return out


# --------------------------------------------------------------------------------------
# Printing


def _num(x, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def format_cost_table(rows: list[dict[str, Any]]) -> str:
    """`train_step_cost` / `time_train_step` results as a fixed-width text table (GFLOPs
    per image, MiB; the timing columns only when some row was run)."""
    timed = any("s_per_step" in r for r in rows)
    head = ["model", "dtype", "remat", "accum", "batch", "step GFLOP/img", "fwd GFLOP/img",
            "2xMACs GFLOP/img", "step/(3xfwd)", "peak MiB", "temp MiB", "held MiB",
            "compile s"]  # fmt: skip
    if timed:
        head += ["ms/step", "img/s", "MFU"]
    table = [head]
    mib, g = 1.0 / 2**20, 1e-9
    for r in rows:
        m = r["memory"]
        row = [f"{r['backbone']} {r['input_size']}", r["dtype"], r.get("remat", "none"),
               str(r.get("grad_accum_steps", 1)), str(r["batch"]),
               _num(r["step_flops_per_image"], ".2f", g),
               _num(r.get("forward_flops_per_image"), ".2f", g),
               _num(r["analytic_forward_flops_per_image"], ".2f", g),
               _num(r["step_over_3x_forward"], ".2f"), _num(m["peak"], ".0f", mib),
               _num(m["temp"], ".0f", mib), _num(r.get("held_for_backward"), ".0f", mib),
               f"{r['lower_s'] + r['compile_s']:.1f}"]  # fmt: skip
        if timed:
            row += [_num(r.get("s_per_step"), ".1f", 1e3), _num(r.get("img_per_s"), ".1f"),
                    _num(r.get("mfu"), ".1%")]  # fmt: skip
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"train step cost on {rows[0]['device']} (host CPU: {cpu_model()})" if rows
             else "train step cost"]  # fmt: skip
    for j, row in enumerate(table):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
