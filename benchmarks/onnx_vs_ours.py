"""Our CPU inference path beside onnxruntime, on the same network, batch 1 (the paper's
protocol without NMS): one process, calls interleaved round by round, medians.

  python benchmarks/onnx_vs_ours.py --configs m2det320_vgg m2det512_vgg \
      --original /path/to/M2Det-clone [--xla_cpu_conv_flags] [--profile]

Rows per config (network only: preprocessed float input -> loc, logits):
* ours: `models.apply_inference` on `inference.prepare_variables` (what evaluation,
  `m2det detect` and `m2det benchmark` run; the config's eval.* settings, e.g. Winograd on
  a CPU), jitted;
* ort(ours): onnxruntime on our ONNX translation of the same network
  (`inference.onnx_export.jaxpr_to_onnx`, BatchNorm folded, plain convolutions);
* ort(original): onnxruntime on the original PyTorch network (`benchmarks/original_net.py`
  on a clone of github.com/qijiezhao/M2Det) exported with `torch.onnx.export`, opset 17
  (only with --original; needs torch).
onnxruntime runs with intra-op threads = the CPU count and its default graph optimizations
(ORT_ENABLE_ALL); the weights are random (timing does not depend on them). Prints the CPU
model and the ratios ours / ort(original) and ours / ort(ours).
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.config import load_config
from m2det_jax.inference import onnx_export as ox
from m2det_jax.inference.variables import prepare_variables
from m2det_jax.models import apply_inference, build_model
from m2det_jax.models.fold import fold_batchnorm
from m2det_jax.perf import runtime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _session(path: str):
    return ox.onnx_session(path, threads=os.cpu_count() or 1)


def original_onnx(cfg, clone: str, path: str) -> None:
    """The original network exported by torch.onnx.export (opset 17) to `path`."""
    import torch  # noqa: PLC0415 - only for this comparison
    from original_net import build_original  # noqa: PLC0415

    s = int(cfg.model.input_size)
    net = build_original(clone, cfg)
    x = torch.zeros(1, 3, s, s)
    with torch.no_grad():
        torch.onnx.export(net, (x,), path, opset_version=17, input_names=["x"],
                          dynamo=False)  # fmt: skip


def profile_ours(fn, calls: int = 3) -> dict[str, float]:
    """Share of XLA:CPU's thread time per kernel kind (a fusion's name without its number,
    e.g. ynn_fusion = YNNPACK convolutions) over `calls` calls of `fn`."""
    import glob
    import re

    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[-1])
    agg: dict[str, float] = {}
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA's worker threads
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue
                kind = re.sub(r"[.\d]+$", "", ev.name)
                agg[kind] = agg.get(kind, 0.0) + ev.duration_ns
    total = sum(agg.values()) or 1.0
    return {k: v / total for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def profile_ort(sess_path: str, feed: dict, calls: int = 3) -> dict[str, float]:
    """Share of onnxruntime's node time per operator type over `calls` runs."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        opts.profile_file_prefix = os.path.join(d, "ort")
        sess = ort.InferenceSession(sess_path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)
        for _ in range(calls):
            sess.run(None, feed)
        events = json.load(open(sess.end_profiling()))
    agg: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            agg[op] = agg.get(op, 0.0) + ev["dur"]
    total = sum(agg.values()) or 1.0
    return {k: v / total for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def _shares(prof: dict[str, float], top: int = 6) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(prof.items())[:top])


def measure(name: str, overrides, rounds: int, clone: str | None, tmp: str,
            profile: bool = False) -> dict:  # fmt: skip
    cfg = load_config(name, overrides)
    s = int(cfg.model.input_size)
    model = build_model(cfg)
    x = np.random.default_rng(0).normal(0, 50, (1, s, s, 3)).astype(np.float32)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, s, s, 3)), train=False))(
        jax.random.key(0))
    variables = jax.device_get(variables)
    prepared = jax.device_put(prepare_variables(cfg, variables))
    ours = jax.jit(lambda v, x: apply_inference(model, v, x))
    folded = fold_batchnorm(variables)
    net = lambda x: apply_inference(model, folded, x)  # noqa: E731
    t = time.perf_counter()
    graph = ox.jaxpr_to_onnx(net, [jax.ShapeDtypeStruct(x.shape, x.dtype)], ["x"],
                             ["loc", "logits"])  # fmt: skip
    ours_onnx = os.path.join(tmp, f"{name}_ours.onnx")
    with open(ours_onnx, "wb") as f:
        f.write(graph.SerializeToString())
    export_s = time.perf_counter() - t
    runs = {"ours": lambda: jax.block_until_ready(ours(prepared, x))}
    sess = _session(ours_onnx)
    runs["ort(ours)"] = lambda: sess.run(None, {"x": x})
    want = np.asarray(ours(prepared, x)["logits"])
    got = sess.run(None, {"x": x})[1]
    diff = float(np.abs(got - want).max() / np.abs(want).max())
    if clone:
        orig = os.path.join(tmp, f"{name}_original.onnx")
        original_onnx(cfg, clone, orig)
        osess = _session(orig)
        xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        runs["ort(original)"] = lambda: osess.run(None, {"x": xt})
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (and compile)
        fn()
        fn()
    for _ in range(rounds):
        for k, fn in runs.items():
            time.sleep(0.2)  # the other library's threads go idle
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    out = {k: float(np.median(v)) for k, v in times.items()}
    if profile:
        out["profile"] = {"ours": profile_ours(runs["ours"]),
                          "ort(ours)": profile_ort(ours_onnx, {"x": x})}  # fmt: skip
        if clone:
            out["profile"]["ort(original)"] = profile_ort(orig, {"x": xt})
    return {"config": name, **out, "export_s": export_s, "logits_rel_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--original", default=None, metavar="PATH",
                    help="a clone of github.com/qijiezhao/M2Det: also time onnxruntime on "
                         "the original network (torch.onnx.export)")  # fmt: skip
    ap.add_argument("--xla_cpu_conv_flags", action="store_true",
                    help="ours with perf.runtime.CPU_CONV_FLAGS (YNNPACK fusions off; jaxlib "
                         "0.10 only), as `m2det ... --xla_cpu_conv_flags`")
    ap.add_argument("--profile", action="store_true",
                    help="also print where each runtime spends its time (kernel kinds)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. eval.winograd=off")
    args = ap.parse_args()
    flags = "default"
    if args.xla_cpu_conv_flags:  # before the first JAX computation
        flags = "conv" if runtime.use_cpu_conv_flags() else "default (conv flags unknown)"
    import onnxruntime

    print(f"CPU: {runtime.cpu_model()}, {os.cpu_count()} cores; onnxruntime "
          f"{onnxruntime.__version__} ({os.cpu_count()} threads); jax {jax.__version__}; "
          f"batch 1, median of {args.rounds} interleaved rounds, network only; ours with "
          f"XLA flags: {flags}")
    cols = ["ours", "ort(ours)"] + (["ort(original)"] if args.original else [])
    head = "| config | " + " | ".join(f"{c} s" for c in cols)
    head += " | ours / ort(original)" if args.original else ""
    print(head + " | ours / ort(ours) | ort(ours) logits rel. diff |")
    print("|---" * (len(cols) + 3 + bool(args.original)) + "|")
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            r = measure(name, args.set, args.rounds, args.original, tmp, args.profile)
            row = f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
            if args.original:
                row += f" | {r['ours'] / r['ort(original)']:.2f}"
            print(f"{row} | {r['ours'] / r['ort(ours)']:.2f} | {r['logits_rel_diff']:.1e} |",
                  flush=True)
            profiles.append((name, r.get("profile", {})))
    for name, prof in profiles:  # thread time shares per kernel kind
        for who, shares in prof.items():
            print(f"{name} {who}: {_shares(shares)}")


if __name__ == "__main__":
    main()
