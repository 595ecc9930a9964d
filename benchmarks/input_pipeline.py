"""Input pipeline throughput (images/s per host) on the shapes set.

    python benchmarks/input_pipeline.py                       # 320px, workers 0 1 2
    python benchmarks/input_pipeline.py --input_size 512 --workers 0 4 8 --batches 50

Builds the default shapes set (2000/200 images, 128x128) into --data_dir on first use,
then times the train iterator (decode + full augmentation + batching) and the eval
iterator (decode + resize + batching) for each worker count, after one warm-up batch
(which includes worker start-up).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import tensorflow_datasets as tfds

from m2det_jax.config import default_config
from m2det_jax.data import pipeline
from m2det_jax.data.shapes import build_shapes


def _time(make, batches: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    it = make()
    b = next(it)  # warm-up: worker start-up, first reads
    startup = time.perf_counter() - t0
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += int(b["mask"].sum())
    rate = n / (time.perf_counter() - t0)
    del it
    gc.collect()
    return rate, startup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=os.path.join("/tmp", "m2det_bench_tfds"))
    p.add_argument("--input_size", type=int, default=320)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    tfds.disable_progress_bar()
    t0 = time.perf_counter()
    builder = build_shapes(args.data_dir)
    print(f"shapes set ready in {time.perf_counter() - t0:.1f} s ({builder.data_dir})")
    cfg = default_config()
    cfg.model.input_size = args.input_size
    print(
        f"input {args.input_size}px, per-host batch {args.batch_size}, {args.batches} batches, "
        f"{os.cpu_count()} CPUs"
    )
    for w in args.workers:
        common = dict(
            builder=builder,
            global_batch_size=args.batch_size,
            num_workers=w,
            shard_index=0,
            shard_count=1,
        )
        tr, tr_s = _time(lambda c=common: pipeline.make_train_iterator(cfg, **c), args.batches)
        ev, ev_s = _time(lambda c=common: pipeline.make_eval_iterator(cfg, **c), args.batches)
        print(
            f"workers={w}: train {tr:7.1f} img/s (start {tr_s:4.1f} s)   "
            f"eval {ev:7.1f} img/s (start {ev_s:4.1f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
