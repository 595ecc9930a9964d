"""Our CPU inference path beside onnxruntime, on the same network, batch 1 (the paper's
protocol without NMS): one process, calls interleaved round by round, medians.

  python benchmarks/onnx_vs_ours.py --configs m2det320_vgg m2det512_vgg \
      --original /path/to/M2Det-clone

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


def measure(name: str, overrides, rounds: int, clone: str | None, tmp: str) -> dict:
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
    return {"config": name, **out, "export_s": export_s, "logits_rel_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--original", default=None, metavar="PATH",
                    help="a clone of github.com/qijiezhao/M2Det: also time onnxruntime on "
                         "the original network (torch.onnx.export)")  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. eval.winograd=off")
    args = ap.parse_args()
    import onnxruntime

    print(f"CPU: {runtime.cpu_model()}, {os.cpu_count()} cores; onnxruntime "
          f"{onnxruntime.__version__} ({os.cpu_count()} threads); jax {jax.__version__}; "
          f"batch 1, median of {args.rounds} interleaved rounds, network only")
    cols = ["ours", "ort(ours)"] + (["ort(original)"] if args.original else [])
    head = "| config | " + " | ".join(f"{c} s" for c in cols)
    head += " | ours / ort(original)" if args.original else ""
    print(head + " | ours / ort(ours) | ort(ours) logits rel. diff |")
    print("|---" * (len(cols) + 3 + bool(args.original)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            r = measure(name, args.set, args.rounds, args.original, tmp)
            row = f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
            if args.original:
                row += f" | {r['ours'] / r['ort(original)']:.2f}"
            print(f"{row} | {r['ours'] / r['ort(ours)']:.2f} | {r['logits_rel_diff']:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
