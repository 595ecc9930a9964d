"""One table of what matters on an accelerator: inference speed as the paper measures it,
train-step throughput, MFU and memory, on whatever device JAX sees.

  python benchmarks/device_check.py                     # GPU/TPU: under 8 minutes
  python benchmarks/device_check.py --quick --configs configs/tiny.py   # CPU smoke run

Per config (default m2det320_vgg and m2det512_vgg, random weights): the paper protocol
(batch 1, network + NMS, FPS; `benchmark.run_benchmark`), batched inference throughput
(batch 8), post-processing alone (ms/image, original settings), and, per compute dtype
(float32 and bfloat16), the jitted train step at `--batch` images on one device
(`costs.time_train_step`): images/s, MFU against the device's dense peak of that dtype
(`costs.PEAK_TFLOPS`; "-" when unknown, e.g. on CPUs), the compiled peak memory and the
step's FLOPs per image. Inference runs once per config, in float32. A measurement that
fails (e.g. out of memory) is reported in the table and the others still run.
"""

import argparse
import os
import sys
import time

import jax

from m2det_jax.config import load_config
from m2det_jax.perf import runtime
from m2det_jax.perf.benchmark import run_benchmark
from m2det_jax.perf.costs import time_train_step

HEAD = ("config", "dtype", "paper FPS", "infer img/s", "post ms/img", "train img/s", "MFU",
        "peak GiB", "step GFLOP/img", "compile s")  # fmt: skip


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _infer_cells(cfg, args) -> tuple[str, str, str]:
    try:
        r = run_benchmark(cfg, batch=args.infer_batch, iters=args.iters)
    except Exception as e:  # noqa: BLE001 - keep the other measurements
        print(f"inference failed: {type(e).__name__}: {e}", file=sys.stderr)
        return ("error",) * 3
    return (f"{r['paper']['fps']:.1f}", f"{r['throughput']['img_per_s']:.1f}",
            f"{1e3 * r['postprocess_original']['s_per_img']:.2f}")  # fmt: skip


def _train_cells(cfg, args) -> tuple[str, ...]:
    try:
        r = time_train_step(cfg, args.batch, args.train_iters, forward=False)
    except Exception as e:  # noqa: BLE001
        print(f"train step failed: {type(e).__name__}: {e}", file=sys.stderr)
        return ("error",) * 5
    return (f"{r['img_per_s']:.1f}", _fmt(r["mfu"], ".1%"), _fmt(r["memory"]["peak"], ".2f",
            1 / 2**30), _fmt(r["step_flops_per_image"], ".1f", 1e-9),
            f"{r['lower_s'] + r['compile_s']:.1f}")  # fmt: skip


def _table(rows) -> str:
    table = [HEAD, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEAD))]
    lines = []
    for j, row in enumerate(table):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        default="configs/m2det320_vgg.py,configs/m2det512_vgg.py",
        help="comma-separated config files",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help="train-step compute dtypes")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="per-device train batch (default 16; 2 with --quick)",
    )
    ap.add_argument("--infer_batch", type=int, default=8, help="inference throughput batch")
    ap.add_argument(
        "--iters", type=int, default=None, help="timed inference calls (default 50; 2 with --quick)"
    )
    ap.add_argument(
        "--train_iters",
        type=int,
        default=None,
        help="timed train steps (default 20; 2 with --quick)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run on a CPU")
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=value (every config)")
    args = ap.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 16)
    args.iters = args.iters or (2 if args.quick else 50)
    args.train_iters = args.train_iters or (2 if args.quick else 20)
    if args.quick:
        args.infer_batch = min(args.infer_batch, 2)

    t0 = time.perf_counter()
    rows = []
    for path in args.configs.split(","):
        name = os.path.splitext(os.path.basename(path))[0]
        cfg = load_config(path, list(args.overrides))
        infer = _infer_cells(cfg, args)
        for i, dtype in enumerate(args.dtypes.split(",")):
            cfg_d = load_config(path, [*args.overrides, f"model.dtype={dtype}"])
            cells = infer if i == 0 else ("-",) * 3
            rows.append((name, dtype, *cells, *_train_cells(cfg_d, args)))
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} visible); "
        f"CPU: {runtime.cpu_model()}; jax {jax.__version__}"
    )
    print(
        f"train batch {args.batch} per device, {args.train_iters} steps; inference "
        f"{args.iters} calls (throughput batch {args.infer_batch}); random weights; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
