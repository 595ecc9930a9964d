"""Device prefetch: how much of the host pipeline hides behind the train step.

    python benchmarks/prefetch.py                          # tiny config, shapes, 30 steps
    python benchmarks/prefetch.py --config configs/shapes.py --steps 20 --sizes 0 1 2 4

Times, in one process, interleaved over --rounds (best round): the host pipeline alone
(next() of the real grain train iterator), the jitted train step alone (one batch already
on the device, reused), and both together through `sharding.DevicePrefetch` with each
buffer size of --sizes (0 = no prefetch: read, place, step, one after the other).
Overlap = (host + step - together) / min(host, step): 0 means serial, 1 means the shorter
of the two is fully hidden.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import tensorflow_datasets as tfds

from m2det_jax import distributed as shd
from m2det_jax import load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.data import open_builder, pipeline
from m2det_jax.data.device_feed import DevicePrefetch
from m2det_jax.models import build_model
from m2det_jax.perf.runtime import cpu_model
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.step import TrainState, make_train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join("configs", "tiny.py"))
    p.add_argument("--data_dir", default=os.path.join("/tmp", "m2det_bench_input"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()

    tfds.disable_progress_bar()
    cfg = load_config(args.config, [
        f"data.data_dir={args.data_dir}", "data.dataset=shapes", "data.num_workers=0",
        "data.shapes_num_train=512", "data.shapes_num_validation=16", "model.num_classes=5"])
    builder = open_builder(cfg)
    mesh = shd.make_mesh()
    model = build_model(cfg)
    schedule = learning_rate_schedule(cfg, 100)
    tx = make_optimizer(cfg, schedule)
    rep = shd.replicated(mesh)
    state = jax.jit(lambda r: TrainState.create(model, tx, cfg, r), out_shardings=rep)(
        jax.random.key(0))  # fmt: skip
    step = jax.jit(make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)),
                   in_shardings=(rep, shd.batch_sharding(mesh)),
                   out_shardings=(rep, rep))  # fmt: skip

    def data():
        return pipeline.make_train_iterator(cfg, builder=builder,
                                            global_batch_size=args.batch_size, num_workers=0,
                                            shard_index=0, shard_count=1)  # fmt: skip

    one = shd.global_batch(next(data()), mesh)
    state, _ = step(state, one)  # compile
    jax.block_until_ready(state)
    n = args.steps
    best: dict[str, float] = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds / n)

    for _ in range(args.rounds):
        it = data()
        next(it)
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        keep("host pipeline alone", time.perf_counter() - t)
        s = state
        t = time.perf_counter()
        for _ in range(n):
            s, _ = step(s, one)
        jax.block_until_ready(s)
        keep("train step alone", time.perf_counter() - t)
        for size in args.sizes:
            batches = DevicePrefetch(data(), mesh, size)
            s, _ = step(state, next(batches))
            jax.block_until_ready(s)
            t = time.perf_counter()
            for _ in range(n):
                s, _ = step(s, next(batches))
            jax.block_until_ready(s)
            keep(f"together, prefetch {size}", time.perf_counter() - t)
            batches.close()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.config}, input "
          f"{cfg.model.input_size}, batch {args.batch_size}, {n} steps, best of {args.rounds}")
    host, dev = best["host pipeline alone"], best["train step alone"]
    for name, sec in best.items():
        line = f"  {name:26s} {sec * 1e3:8.1f} ms/step"
        if name.startswith("together"):
            line += f"   overlap {(host + dev - sec) / min(host, dev):5.2f}"
        print(line)


if __name__ == "__main__":
    main()
