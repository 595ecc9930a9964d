"""Forward speed of M2Det on whatever devices exist: s/img at batch B, compile time apart,
and the fraction of the machine's measured matmul peak (2 x MACs / time / peak), with XLA's
default CPU flags and with `perf.runtime.CPU_CONV_FLAGS`, side by side in one run (each setting
in its own subprocess: XLA reads its flags once per process).

  python benchmarks/forward.py --configs m2det320_vgg m2det512_vgg --batch 1

Two paths of ours are timed: "apply" is `jax.jit(model.apply)` (the model's own call,
direct convolutions) and "inference" is `models.apply_inference` on
`inference.prepare_variables(cfg, variables)`, what evaluation, `m2det detect`, `m2det
export` and `m2det benchmark` run (with the default `eval.winograd="auto"` on a CPU: the
wide 3x3 convolutions as Winograd F(4x4, 3x3)). `--config.eval.winograd=off` style
overrides go through `--set`.

With `--vs-original PATH` (a clone of github.com/qijiezhao/M2Det; torch installed) the
original PyTorch network (`benchmarks/original_net.py`, PyTorch's threads = the CPU count)
is timed in the same processes, alternating with both of ours call by call, on the same
input.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from m2det_jax.config import load_config
from m2det_jax.inference.variables import prepare_variables
from m2det_jax.models import apply_inference, build_model
from m2det_jax.perf import runtime
from m2det_jax.perf.benchmark import forward_speed, peak_gflops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original_net import build_original  # noqa: E402 - benchmarks/ is not a package


def versus_original(cfg, path: str, iters: int) -> dict:
    """Median seconds of ours (both paths) and of the original at batch 1, alternating call
    by call (a pause between calls lets the other library's threads go idle)."""
    import torch  # noqa: PLC0415 - only for this comparison

    torch.set_num_threads(os.cpu_count() or 1)
    s = int(cfg.model.input_size)
    x = np.random.default_rng(0).normal(0, 50, (1, s, s, 3)).astype(np.float32)
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    inference = jax.jit(lambda v, x: apply_inference(model, v, x))
    prepared = jax.device_put(prepare_variables(cfg, variables))
    net, xt = build_original(path, cfg), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    runs = {"apply": lambda: jax.block_until_ready(apply(variables, x)),
            "inference": lambda: jax.block_until_ready(inference(prepared, x)),
            "original": lambda: net(xt)}  # fmt: skip
    ref = np.asarray(apply(variables, x)["logits"])
    diff = np.abs(np.asarray(inference(prepared, x)["logits"]) - ref).max() / np.abs(ref).max()
    times = {k: [] for k in runs}
    with torch.no_grad():
        for k in runs:  # warm-up (and compile)
            runs[k]()
            runs[k]()
        for _ in range(iters):
            for k, fn in runs.items():
                time.sleep(0.2)
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {**{f"{k}_s": float(np.median(v)) for k, v in times.items()},
            "logits_rel_diff": float(diff)}


def measure(args) -> None:
    """One setting, in this process: prints one JSON line per config."""
    if args.flags == "conv":
        runtime.use_cpu_conv_flags()
    peak = peak_gflops()
    for name in args.configs:
        cfg = load_config(name, [f"model.dtype={args.dtype}", *args.set])
        if args.vs_original:
            r = versus_original(cfg, args.vs_original, args.iters)
            print(json.dumps({"config": name, "peak": peak, **r}), flush=True)
            continue
        for path in ("apply", "inference"):
            r = forward_speed(cfg, batch=args.batch, iters=args.iters,
                              inference=path == "inference")  # fmt: skip
            print(json.dumps({"config": name, "path": path, "peak": peak, **r}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["m2det320_vgg", "m2det512_vgg"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--flags", choices=("both", "default", "conv"), default="both",
                    help="XLA:CPU flags: default, runtime.CPU_CONV_FLAGS, or both side by side")
    ap.add_argument("--vs-original", dest="vs_original", default=None, metavar="PATH",
                    help="time the original PyTorch network of this clone beside ours "
                         "(batch 1, alternating)")  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. eval.winograd=off")
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
               "--configs", *args.configs, "--set", *args.set]
        if args.vs_original:
            cmd += ["--vs-original", args.vs_original]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows += [(setting, json.loads(line)) for line in out.splitlines() if line.startswith("{")]
    if args.vs_original:
        # The last column: max |inference - apply| / max |apply| of the logits.
        print("| config | XLA flags | apply s/img | inference s/img | original s/img "
              "| apply / original | inference / original | logits rel. diff |")
        print("|---|---|---|---|---|---|---|---|")
        for setting, r in sorted(rows, key=lambda x: x[1]["config"]):
            o = r["original_s"]
            print(f"| {r['config']} | {setting} | {r['apply_s']:.3f} | {r['inference_s']:.3f} "
                  f"| {o:.3f} | {r['apply_s'] / o:.2f} | {r['inference_s'] / o:.2f} "
                  f"| {r['logits_rel_diff']:.1e} |")
        return
    # GFLOP/s counts the direct convolutions' MACs for both paths (the work the network
    # asks for; Winograd does less arithmetic, so its "% peak" can exceed 100).
    hdr = ("config", "path", "XLA flags", "batch", "compile s", "s/img", "GFLOP/s", "% peak")
    print(f"{hdr[0]:16s} {hdr[1]:>9s} {hdr[2]:>9s} {hdr[3]:>5s} {hdr[4]:>9s} {hdr[5]:>7s} "
          f"{hdr[6]:>8s} {hdr[7]:>6s}")
    for setting, r in sorted(rows, key=lambda x: (x[1]["config"], x[1]["path"])):
        print(f"{r['config']:16s} {r['path']:>9s} {setting:>9s} {r['batch']:5d} "
              f"{r['compile_s']:9.1f} {r['s_per_img']:7.3f} {r['gflops']:8.0f} "
              f"{100 * r['gflops'] / r['peak']:6.0f}")


if __name__ == "__main__":
    main()
