"""Does bf16 train as well as float32? The shapes recipe both ways, same init and data.

  python benchmarks/bf16_shapes.py                          # the full recipe, twice
  python benchmarks/bf16_shapes.py train.num_epochs=4 'train.lr_epochs=(3,4)'   # shorter

Trains `configs/shapes.py` (builds the shapes set on first use) with model.dtype float32
and then bfloat16 (master weights, optimizer state, BatchNorm statistics, loss and NMS
stay float32), each in a fresh workdir from the same seed, and prints their COCO metrics
side by side with the wall time and the CPU model. The issue's bar: AP50 within 0.03.
bf16 is a numerical question on a CPU (no native bf16 here: it is not faster); its speed
is for accelerators (benchmarks/device_check.py).
"""

import argparse
import tempfile
import time

from m2det_jax.config import load_config
from m2det_jax.perf import runtime
from m2det_jax.train.loop import train_and_evaluate

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--data_dir", default=None, help="shapes data dir (default: the config's)")
    ap.add_argument("overrides", nargs="*", help="a.b=value, applied to both runs")
    args = ap.parse_args()
    extra = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(args.config, [*args.overrides, *extra, f"model.dtype={dtype}"])
        with tempfile.TemporaryDirectory() as wd:
            t0 = time.perf_counter()
            r = train_and_evaluate(cfg, wd, progress=False)
            rows[dtype] = (r["eval_metrics"], time.perf_counter() - t0, r["step"])
        print(f"{dtype}: {rows[dtype]}", flush=True)
    print(f"\nshapes recipe {' '.join(args.overrides) or '(as shipped)'}; "
          f"CPU: {runtime.cpu_model()}")  # fmt: skip
    print("| dtype | steps | wall min | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for dtype, (m, wall, steps) in rows.items():
        vals = " | ".join(f"{m.get(k, float('nan')):.3f}" for k in METRICS)
        print(f"| {dtype} | {steps} | {wall / 60:.1f} | {vals} |")
    d = rows["bfloat16"][0]["AP50"] - rows["float32"][0]["AP50"]
    verdict = "met" if abs(d) <= 0.03 else "NOT met"
    print(f"AP50 bf16 - float32: {d:+.3f} (bar: |diff| <= 0.03: {verdict})")


if __name__ == "__main__":
    main()
