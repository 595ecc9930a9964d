"""Train-step throughput (images/s) and compile time for a config on whatever devices exist.

  python benchmarks/train_step.py --config configs/shapes.py --batch 32 --steps 10
  python benchmarks/train_step.py --config configs/m2det320_vgg.py --batch 2 --steps 3

The batch is synthetic (the input pipeline is measured by benchmarks/input_pipeline.py).
"""

import argparse
import time

import jax
import numpy as np

from m2det_jax import distributed as shd
from m2det_jax.config import load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import build_model
from m2det_jax.perf import runtime
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.step import TrainState, make_train_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="a.b=value")
    ap.add_argument("--xla_cpu_conv_flags", action="store_true",
                    help="runtime.use_cpu_conv_flags() before JAX starts")
    args = ap.parse_args()
    if args.xla_cpu_conv_flags:
        runtime.use_cpu_conv_flags()
    cfg = load_config(args.config, [f"train.batch_size={args.batch}", *args.overrides])
    mesh = shd.make_mesh()
    schedule = learning_rate_schedule(cfg, 100)
    model, tx = build_model(cfg), make_optimizer(cfg, schedule)
    state = jax.jit(lambda r: TrainState.create(model, tx, cfg, r),
                    out_shardings=shd.replicated(mesh))(jax.random.key(0))  # fmt: skip
    s, g, b = cfg.model.input_size, cfg.data.max_boxes, args.batch
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.5, (b, g, 2))
    batch = shd.global_batch({
        "image": rng.normal(0, 50, (b, s, s, 3)).astype(np.float32),
        "boxes": np.concatenate([xy, xy + 0.3], -1).astype(np.float32),
        "labels": np.ones((b, g), np.int32), "valid": np.ones((b, g), bool),
        "mask": np.ones(b, bool)}, mesh)  # fmt: skip
    step = jax.jit(make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)),
                   in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
                   out_shardings=(shd.replicated(mesh), shd.replicated(mesh)),
                   donate_argnums=(0,))  # fmt: skip
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / args.steps
    print(f"{runtime.cpu_model()}: devices {len(jax.devices())} x {jax.devices()[0].platform}  "
          f"config {args.config}  batch {b}: compile {compile_s:.1f} s, {dt:.3f} s/step, "
          f"{b / dt:.1f} images/s")


if __name__ == "__main__":
    main()
