"""Forward speed of M2Det on whatever devices exist: s/img at batch B, compile time apart,
and the fraction of the machine's measured matmul peak (2 x MACs / time / peak), with XLA's
default CPU flags and with `runtime.CPU_CONV_FLAGS`, side by side in one run (each setting
in its own subprocess: XLA reads its flags once per process).

  python benchmarks/forward.py --configs m2det320_vgg m2det512_vgg --batch 1

Timings of the original PyTorch network on the development machines are in
docs/original.md (§9).
"""

import argparse
import json
import os
import subprocess
import sys

from m2det_jax import runtime
from m2det_jax.benchmark import forward_speed, peak_gflops
from m2det_jax.config import load_config


def measure(args) -> None:
    """One setting, in this process: prints one JSON line per config."""
    if args.flags == "conv":
        runtime.use_cpu_conv_flags()
    peak = peak_gflops()
    for name in args.configs:
        cfg = load_config(name, [f"model.dtype={args.dtype}"])
        r = forward_speed(cfg, batch=args.batch, iters=args.iters)
        print(json.dumps({"config": name, "peak": peak, **r}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--flags", choices=("both", "default", "conv"), default="both",
                    help="XLA:CPU flags: default, runtime.CPU_CONV_FLAGS, or both side by side")
    ap.add_argument("--measure_one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_one:
        return measure(args)
    settings = ["default", "conv"] if args.flags == "both" else [args.flags]
    if "conv" in settings and not runtime.cpu_conv_flags_supported():
        print("this jaxlib does not know runtime.CPU_CONV_FLAGS: default flags only")
        settings = ["default"]
    print(f"CPU: {runtime.cpu_model()}; XLA_FLAGS of the caller: "
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for setting in settings:  # one subprocess per setting (XLA reads flags at start)
        cmd = [sys.executable, __file__, "--measure_one", "--flags", setting, "--batch",
               str(args.batch), "--iters", str(args.iters), "--dtype", args.dtype,
               "--configs", *args.configs]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows += [(setting, json.loads(line)) for line in out.splitlines() if line.startswith("{")]
    hdr = ("config", "XLA flags", "batch", "compile s", "s/img", "GFLOP/s", "% peak")
    print(f"{hdr[0]:16s} {hdr[1]:>9s} {hdr[2]:>5s} {hdr[3]:>9s} {hdr[4]:>7s} {hdr[5]:>8s} "
          f"{hdr[6]:>6s}")
    for setting, r in sorted(rows, key=lambda x: x[1]["config"]):
        print(f"{r['config']:16s} {setting:>9s} {r['batch']:5d} {r['compile_s']:9.1f} "
              f"{r['s_per_img']:7.3f} {r['gflops']:8.0f} {100 * r['gflops'] / r['peak']:6.0f}")


if __name__ == "__main__":
    main()
