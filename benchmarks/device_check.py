"""What matters on an accelerator, in three tables for whatever device JAX sees.

  python benchmarks/device_check.py                    # one GPU/TPU: about 8 minutes
  python benchmarks/device_check.py --quick --configs configs/tiny.py   # CPU smoke run
  python3 launch/device_kit.py run -- ARGS             # on an offline accelerator image

Per config (default m2det320_vgg, m2det512_vgg; random weights) and arithmetic (float32 at
JAX's default precision: TF32 on Ampere/Hopper GPUs, one bf16 pass on TPUs; float32 at
"highest"; bfloat16):

1. inference, the paper protocol (batch 1): the network alone; network + decode + NMS in
   one program fed a detection-shaped output (`perf.device_figures`: ~7 objects, the
   candidate count printed) and the NMS share of that latency; the same program on the
   dense worst case (every class over `candidates_per_class`); batch-8 throughput.
2. training at --batch per device (`costs.time_train_step`, a synthetic batch): images/s,
   MFU against the peak of the arithmetic that runs (the "math" column), the compiled
   memory plan beside the device's measured peak (`memory_stats`, process so far).
3. end to end on a generated COCO-size JPEG folder (first config, float32): the real train
   loop (grain pipeline, `data.prefetch` 2) with 0 and the automatic number of grain
   workers beside the synthetic-batch step of table 2 (does the host keep up?), and
   evaluation images/s (decode, network, NMS, COCO metric).

Compiled programs are cached in --cache (a second run compiles little). Each table has a
time budget (--budget seconds): measurements past it are skipped and listed. A failed
measurement (e.g. out of memory) prints "error" and the rest still run. --json writes
every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from m2det_jax.config import load_config
from m2det_jax.inference.variables import prepare_variables
from m2det_jax.models import build_model
from m2det_jax.perf import device_figures as figs
from m2det_jax.perf import runtime
from m2det_jax.perf.costs import device_peak_bytes, time_train_step
from m2det_jax.train.meter import math_of

VARIANTS = {"float32": ("float32", None), "float32-highest": ("float32", "highest"),
            "bfloat16": ("bfloat16", None)}
INFER_HEAD = ("config", "math", "net ms", "net+NMS ms", "NMS share", "cands/img",
              "dense ms", "dense cands", "b8 img/s", "compile s")  # fmt: skip
TRAIN_HEAD = ("config", "math", "img/s", "MFU", "peak TFLOP/s", "plan GiB", "device GiB",
              "GFLOP/img", "compile s")  # fmt: skip
E2E_HEAD = ("config", "what", "workers", "img/s", "synthetic img/s", "keeps up")


def _table(head, rows) -> str:
    table = [head, *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    lines = []
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _precision(p):
    return jax.default_matmul_precision(p) if p else contextlib.nullcontext()


def _math(dtype, precision) -> str:
    return math_of(jax.devices()[0].device_kind, dtype, precision or
                   jax.config.jax_default_matmul_precision) + (" (highest)" if precision else "")


def inference_rows(name, path, args, budget, out):
    cfg32 = load_config(path, list(args.overrides))
    s = int(cfg32.model.input_size)
    x1 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, s, s, 3), np.uint8))
    variables = jax.jit(build_model(cfg32).init)(jax.random.key(0), x1.astype(jnp.float32))
    sizes = {b: jnp.full((b, 2), float(s), jnp.float32) for b in (1, args.infer_batch)}
    xb = jnp.asarray(np.random.default_rng(1).integers(0, 256, (args.infer_batch, s, s, 3),
                                                       np.uint8))  # fmt: skip
    typical = [jnp.asarray(a) for a in figs.detection_shaped(cfg32, 1)]
    typical_b = [jnp.asarray(a) for a in figs.detection_shaped(cfg32, args.infer_batch)]
    dense = [jnp.asarray(a) for a in figs.dense_worst_case(cfg32, 1)]
    cands = figs.nms_candidates(cfg32, np.asarray(typical[1]))
    dense_cands = figs.nms_candidates(cfg32, np.asarray(dense[1]))
    zero = jnp.float32(0.0)
    rows = []
    for dtype, precision in (VARIANTS[v] for v in args.variants):
        math = _math(dtype, precision)
        if not budget.left(f"inference {name} {math}"):
            continue
        try:
            cfg = load_config(path, [*args.overrides, f"model.dtype={dtype}"])
            v = jax.device_put(prepare_variables(cfg, variables))
            t = time.perf_counter()
            with _precision(precision):
                net = figs.network_fn(cfg).lower(v, x1).compile()
                fused_fn = figs.fused_inference_fn(cfg)
                fused = fused_fn.lower(v, x1, sizes[1], zero, *typical).compile()
                fused_b = fused_fn.lower(v, xb, sizes[args.infer_batch], zero,
                                         *typical_b).compile()  # fmt: skip
            compile_s = time.perf_counter() - t
            net_s = figs.median_seconds(net, (v, x1), args.iters)
            with_s = figs.median_seconds(fused, (v, x1, sizes[1], zero, *typical), args.iters)
            dense_s = figs.median_seconds(fused, (v, x1, sizes[1], zero, *dense), args.iters)
            b_s = figs.median_seconds(fused_b, (v, xb, sizes[args.infer_batch], zero, *typical_b),
                                      max(1, args.iters // 2))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - keep the other measurements
            print(f"inference {name} {math} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append((name, math, *("error",) * (len(INFER_HEAD) - 2)))
            continue
        share = max(0.0, 1.0 - net_s / with_s)
        r = {"config": name, "math": math, "net_ms": 1e3 * net_s, "net_nms_ms": 1e3 * with_s,
             "nms_share": share, "candidates": cands, "dense_ms": 1e3 * dense_s,
             "dense_candidates": dense_cands, "batch": args.infer_batch,
             "img_per_s": args.infer_batch / b_s, "compile_s": compile_s}  # fmt: skip
        out.setdefault("inference", []).append(r)
        rows.append((name, math, f"{r['net_ms']:.2f}", f"{r['net_nms_ms']:.2f}", f"{share:.0%}",
                     f"{cands:.0f}", f"{r['dense_ms']:.2f}", f"{dense_cands:.0f}",
                     f"{r['img_per_s']:.1f}", f"{compile_s:.1f}"))  # fmt: skip
    return rows


def train_rows(name, path, args, budget, out):
    rows = []
    for dtype, precision in (VARIANTS[v] for v in args.variants):
        math = _math(dtype, precision)
        if not budget.left(f"train {name} {math}"):
            continue
        cfg = load_config(path, [*args.overrides, f"model.dtype={dtype}"])
        try:
            with _precision(precision):
                r = time_train_step(cfg, args.batch, args.train_iters, forward=False)
        except Exception as e:  # noqa: BLE001
            print(f"train {name} {math} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append((name, math, *("error",) * (len(TRAIN_HEAD) - 2)))
            continue
        out.setdefault("train", []).append({"config": name, "math": math, **{
            k: r[k] for k in ("img_per_s", "mfu", "peak_tflops", "step_flops_per_image",
                              "device_peak_bytes", "lower_s", "compile_s", "batch")},
            "plan_peak_bytes": r["memory"]["peak"]})  # fmt: skip
        rows.append((name, math, f"{r['img_per_s']:.1f}", _f(r["mfu"], ".1%"),
                     _f(r["peak_tflops"], ".0f"), _f(r["memory"]["peak"], ".2f", 2**-30),
                     _f(r["device_peak_bytes"], ".2f", 2**-30),
                     _f(r["step_flops_per_image"], ".1f", 1e-9),
                     f"{r['lower_s'] + r['compile_s']:.1f}"))  # fmt: skip
    return rows


def _coco_folder_overrides(args, root) -> tuple[list[str], int]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from input_pipeline import make_coco_like  # noqa: E402 - a sibling script

    n, (h, w) = (24, (240, 320)) if args.quick else (256, (480, 640))
    image_dir, ann = make_coco_like(os.path.join(root, "coco_like"), n=n, h=h, w=w)
    return [*args.overrides, "data.dataset=coco_folder", f"data.data_dir={root}",
            f"data.image_dir={image_dir}", f"data.annotation_file={ann}",
            f"data.eval_annotation_file={ann}", "model.num_classes=4", "data.prefetch=2"], n


def end_to_end_rows(name, path, args, budget, out, synthetic):
    from m2det_jax.data import open_builder
    from m2det_jax.evaluation.driver import evaluate_variables
    from m2det_jax.train.loop import train_and_evaluate

    rows, root = [], args.data_dir or tempfile.mkdtemp(prefix="m2det_device_check_")
    folder, n_images = _coco_folder_overrides(args, root)
    cfg = load_config(path, folder)
    gb = args.batch * jax.device_count()
    steps = 4 if args.quick else 30
    auto = 0 if (os.cpu_count() or 1) <= 2 else min(8, (os.cpu_count() or 1) - 1)
    builder = open_builder(cfg)
    for workers in sorted({0, auto}):
        if not budget.left(f"end to end {name} train, {workers} workers"):
            continue
        wd = tempfile.mkdtemp(prefix="m2det_device_check_run_")
        c = load_config(path, [*folder, f"train.batch_size={gb}",
                               f"train.num_steps={steps}", f"train.log_every={steps // 2}",
                               f"train.checkpoint_every={10 * steps}", "train.eval_every=-1",
                               f"data.num_workers={workers}"])  # fmt: skip
        try:
            train_and_evaluate(c, wd, progress=False)
            with open(os.path.join(wd, "metrics.jsonl")) as f:
                last = [json.loads(line) for line in f if '"images_per_sec"' in line][-1]
            rate = float(last["images_per_sec"])
        except Exception as e:  # noqa: BLE001
            print(f"end-to-end train failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append((name, "train (real pipeline)", str(workers), "error", "-", "-"))
            continue
        keeps = "-" if synthetic is None else ("yes" if rate >= 0.9 * synthetic else "no")
        out.setdefault("end_to_end", []).append({"config": name, "what": "train",
                                                 "workers": workers, "img_per_s": rate,
                                                 "synthetic_img_per_s": synthetic})  # fmt: skip
        rows.append((name, "train (real pipeline)", str(workers), f"{rate:.1f}",
                     _f(synthetic, ".1f"), keeps))  # fmt: skip
    if budget.left(f"end to end {name} evaluation"):
        try:
            variables = jax.jit(build_model(cfg).init)(
                jax.random.key(0), jnp.zeros((1, cfg.model.input_size, cfg.model.input_size, 3)))
            evaluate_variables(cfg, variables, builder=builder)  # compiles
            t = time.perf_counter()
            evaluate_variables(cfg, variables, builder=builder)
            rate = n_images / (time.perf_counter() - t)
            out.setdefault("end_to_end", []).append({"config": name, "what": "evaluation",
                                                     "img_per_s": rate})  # fmt: skip
            rows.append((name, "evaluation (random weights)", "auto", f"{rate:.1f}", "-", "-"))
        except Exception as e:  # noqa: BLE001
            print(f"end-to-end evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append((name, "evaluation", "auto", "error", "-", "-"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="configs/m2det320_vgg.py,configs/m2det512_vgg.py",
                    help="comma-separated config files")  # fmt: skip
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, of " + ", ".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="per-device train batch (16; 2 quick)")
    ap.add_argument("--infer_batch", type=int, default=8, help="inference throughput batch")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (30; 2 quick)")
    ap.add_argument("--train_iters", type=int, default=None, help="timed steps (20; 2 quick)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per table (150; 120 quick); later rows are skipped")
    ap.add_argument("--cache", default=os.path.join("build", "jax_cache"),
                    help="persistent compilation cache ('' for none)")
    ap.add_argument("--data_dir", default="", help="where the generated COCO folder goes")
    ap.add_argument("--no_end_to_end", action="store_true", help="skip table 3")
    ap.add_argument("--json", default="", help="write every figure here")
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run on a CPU")
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=value (every config)")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown[0]!r} (one of {', '.join(VARIANTS)})")
    args.batch = args.batch or (2 if args.quick else 16)
    args.iters = args.iters or (2 if args.quick else 30)
    args.train_iters = args.train_iters or (2 if args.quick else 20)
    args.budget = args.budget if args.budget is not None else (120.0 if args.quick else 150.0)
    if args.quick:
        args.infer_batch = min(args.infer_batch, 2)
    tfds.disable_progress_bar()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.cache))

    t0 = time.perf_counter()
    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "platform": dev.platform, "cpu": runtime.cpu_model(),
           "jax": jax.__version__, "devices": jax.device_count()}  # fmt: skip
    paths = args.configs.split(",")
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    budgets = {k: figs.Budget(args.budget) for k in ("inference", "train", "end_to_end")}
    infer, train, e2e = [], [], []
    for name, path in zip(names, paths, strict=True):
        infer += inference_rows(name, path, args, budgets["inference"], out)
    for name, path in zip(names, paths, strict=True):
        train += train_rows(name, path, args, budgets["train"], out)
    if not args.no_end_to_end:
        synthetic = next((r["img_per_s"] for r in out.get("train", [])
                          if r["config"] == names[0] and r["math"] == _math("float32", None)),
                         None)  # fmt: skip
        e2e = end_to_end_rows(names[0], paths[0], args, budgets["end_to_end"], out, synthetic)
    print(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} visible); "
          f"CPU: {runtime.cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"{time.perf_counter() - t0:.0f} s in all; device memory peak "
          f"{_f(device_peak_bytes(dev), '.2f', 2**-30)} GiB")  # fmt: skip
    print(f"\n1. inference, batch 1 (b8: batch {args.infer_batch}), median of {args.iters} "
          f"calls; random weights, NMS fed a detection-shaped output (cands/img)")
    print(_table(INFER_HEAD, infer))
    print(f"\n2. train step, {args.batch} images per device, {args.train_iters} steps; MFU "
          f"against the peak of the math column; device GiB: measured peak so far")
    print(_table(TRAIN_HEAD, train))
    if not args.no_end_to_end:
        print("\n3. end to end on a generated COCO-size JPEG folder (float32)")
        print(_table(E2E_HEAD, e2e))
    skipped = [w for b in budgets.values() for w in b.skipped]
    out["skipped"] = skipped
    if skipped:
        print(f"\nskipped, over the {args.budget:.0f} s budget of their table: "
              + "; ".join(skipped))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
