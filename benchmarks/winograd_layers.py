"""Per-layer check of the Winograd plan on this machine: every 3x3 stride-1 convolution a
config runs (one row per distinct shape), the direct convolution (`lax.conv_general_dilated`,
what `model.apply` runs) and `winograd_conv` timed alternately in one process, and whether
`eval.winograd_min_channels` / `eval.winograd_min_pixels` pick it.

  python benchmarks/winograd_layers.py --configs m2det320_vgg m2det512_vgg

A row where "planned" and "faster" disagree is a layer the thresholds get wrong on this
machine; tune them with `--config.eval.winograd_min_channels=...` and check the whole
network with `benchmarks/forward.py`.
"""

import argparse
import time

import jax
import numpy as np

from m2det_jax.config import load_config
from m2det_jax.models import build_model
from m2det_jax.models.winograd import candidates, plan, winograd_conv, winograd_kernel
from m2det_jax.perf import runtime


def time_layer(c, iters: int) -> tuple[float, float, float]:
    """(direct s, Winograd s, max |difference| / max |direct|) for one candidate."""
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(0, 1, c.input_shape).astype(np.float32))
    w = jax.device_put(rng.normal(0, 0.05, (3, 3, c.input_shape[-1], c.features))
                       .astype(np.float32))  # fmt: skip
    u = winograd_kernel(w)
    pad = [(p, p) for p in c.padding]
    direct = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))  # fmt: skip
    wino = jax.jit(lambda x, u: winograd_conv(x, u, c.padding))
    a, b = np.asarray(direct(x, w)), np.asarray(wino(x, u))
    err = float(np.abs(a - b).max() / np.abs(a).max())
    times: dict[str, list[float]] = {"direct": [], "wino": []}
    for _ in range(iters):
        for name, fn, args in (("direct", direct, (x, w)), ("wino", wino, (x, u))):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    return float(np.median(times["direct"])), float(np.median(times["wino"])), err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print(f"CPU: {runtime.cpu_model()}, {jax.devices()[0].device_kind}")
    print("| config | input [H, W, C] -> K, padding | layers | planned | direct ms | Winograd ms "
          "| Winograd / direct | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    planned = []
    for name in args.configs:
        cfg = load_config(name, args.set)
        s = int(cfg.model.input_size)
        model = build_model(cfg)
        shape = (1, s, s, 3)
        found = candidates(model, shape)
        chosen = set(plan(model, shape, cfg.eval.winograd_min_channels,
                          cfg.eval.winograd_min_pixels))  # fmt: skip
        planned.append((name, [c for c in found if c.path in chosen]))
        shapes: dict[tuple, list] = {}  # one row per distinct shape, in call order
        for c in found:
            shapes.setdefault((c.input_shape, c.features, c.padding), []).append(c)
        for group in shapes.values():
            c = group[0]
            d, w, err = time_layer(c, args.iters)
            _, h, wd, ch = c.input_shape
            print(f"| {name} | [{h}, {wd}, {ch}] -> {c.features}, {c.padding[0]} | "
                  f"{len(group)} | {'yes' if c.path in chosen else 'no'} | {1e3 * d:.1f} | "
                  f"{1e3 * w:.1f} | {w / d:.2f} | {err:.1e} |", flush=True)
    for name, cs in planned:  # what the plan costs in memory: [36, C, K] float32 kernels
        gib = sum(36 * c.input_shape[-1] * c.features * 4 for c in cs) / 2**30
        direct = sum(9 * c.input_shape[-1] * c.features * 4 for c in cs) / 2**30
        print(f"{name}: {len(cs)} layers planned; transformed kernels {gib:.2f} GiB "
              f"(the float32 direct kernels they replace: {direct:.2f} GiB)")


if __name__ == "__main__":
    main()
