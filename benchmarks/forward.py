"""Forward speed of M2Det on whatever devices exist: s/img at batch B, compile time apart,
and the fraction of the machine's measured matmul peak (2 x MACs / time / peak).

  python benchmarks/forward.py --configs m2det320_vgg m2det512_vgg --batch 1
  XLA_FLAGS= python benchmarks/forward.py ...   # without the CPU flags the CLI sets

Optionally side by side with the original PyTorch network rebuilt from the converted
weights is out of scope here; ORIGINAL.md §9 lists its CPU timings.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from m2det_jax.cli import _set_xla_flags  # noqa: E402

_set_xla_flags()

from m2det_jax.cli import _peak_gflops, forward_speed  # noqa: E402
from m2det_jax.config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import jax

    peak = _peak_gflops()
    print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"measured f32 matmul peak: {peak:.0f} GFLOP/s")
    hdr = ('config', 'batch', 'compile s', 's/img', 'GFLOP/s', '% peak')
    print(f"{hdr[0]:22s} {hdr[1]:>5s} {hdr[2]:>9s} {hdr[3]:>7s} {hdr[4]:>8s} {hdr[5]:>6s}")
    for name in args.configs:
        cfg = load_config(name, [f"model.dtype={args.dtype}"])
        r = forward_speed(cfg, batch=args.batch, iters=args.iters)
        print(f"{name:22s} {args.batch:5d} {r['compile_s']:9.1f} {r['s_per_img']:7.3f} "
              f"{r['gflops']:8.0f} {100 * r['gflops'] / peak:6.0f}")


if __name__ == "__main__":
    main()
