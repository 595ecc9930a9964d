"""The `m2det` command line: thin wrappers that parse flags and call the library.

Every subcommand takes `--config path.py` plus `--config.a.b=value` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# XLA CPU flags that matter on this class of machine (measured: ../README.md, Speed).
# Applied before JAX starts, only if the user has not set XLA_FLAGS themselves.
_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def _set_xla_flags() -> None:
    if "XLA_FLAGS" in os.environ:
        return
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("jaxlib").split(".")[:2])
    except Exception:  # noqa: BLE001 - unknown jaxlib: leave the defaults alone
        return
    if (major, minor) == (0, 10):  # unknown XLA flags abort the process: only known ones
        os.environ["XLA_FLAGS"] = _CPU_XLA_FLAGS


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                overrides.append(a[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(a[len("--config."):] + "=" + argv[i + 1])
                i += 1
            else:
                raise SystemExit(f"error: {a} needs a value")
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _load(args, overrides):
    from m2det_jax.config import load_config

    try:
        return load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_convert(args, cfg) -> int:
    from m2det_jax.checkpoints import save_variables
    from m2det_jax.convert import CheckpointMismatchError, convert_torch_state_dict
    from m2det_jax.stats import count_params

    try:
        variables = convert_torch_state_dict(args.checkpoint, cfg)
    except (CheckpointMismatchError, ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    if set(variables.get("params", {})) == {"backbone"}:
        print("backbone-only weights (ImageNet init): saving the backbone subtree")
    out = args.output or os.path.join(args.workdir, "converted")
    save_variables(out, variables, cfg, source=os.path.abspath(args.checkpoint))
    print(f"converted {count_params(variables['params']):,} parameters -> {out}")
    return 0


def _peak_gflops(seconds: float = 2.0) -> float:
    """Measured f32 matmul throughput of this machine (XLA), the denominator for efficiency."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def forward_speed(cfg, variables=None, batch: int = 1, iters: int = 5) -> dict:
    """Compile time and median seconds per forward pass at `batch` (random weights if None)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2det_jax.models import build_model
    from m2det_jax.stats import count_macs

    model = build_model(cfg)
    s = cfg.model.input_size
    x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (batch, s, s, 3)), jnp.float32)
    if variables is None:
        variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t = time.perf_counter()
    compiled = fwd.lower(variables, x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(variables, x))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    macs = count_macs(model, variables, s, batch)
    return {
        "input_size": s,
        "batch": batch,
        "compile_s": compile_s,
        "s_per_img": sec / batch,
        "gflops": 2 * macs / sec / 1e9,
    }


def cmd_verify(args, cfg) -> int:
    """Converts the seeded reference weights and compares with the original's outputs."""
    import jax
    import numpy as np

    from m2det_jax.convert import convert_torch_state_dict
    from m2det_jax.models import build_model
    from m2det_jax.priors import prior_boxes
    from m2det_jax.reference import load_fixture, seeded_weights

    if cfg.model.backbone != "vgg16" or cfg.model.input_size != 320 or cfg.model.sfam:
        raise SystemExit("error: the shipped reference is m2det320_vgg: use that config")
    fx = load_fixture()
    t = time.perf_counter()
    variables = convert_torch_state_dict(seeded_weights(fx["keys"]), cfg)
    print(f"converted {len(fx['keys'])} state_dict entries in {time.perf_counter() - t:.2f} s")
    priors_ok = np.array_equal(prior_boxes(cfg), fx["priors"])
    print(f"priors bit-identical to the original: {priors_ok}")
    model = build_model(cfg)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, fx["input"])
    ok = priors_ok
    for name, ref in (("loc", fx["loc"]), ("logits", fx["conf"])):
        got = np.asarray(out[name])
        err = float(np.abs(got - ref).max())
        tol_ok = np.allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
        ok &= tol_ok
        print(f"{name:6s} max|diff| {err:.2e} (max|ref| {np.abs(ref).max():.2f}) "
              f"within rtol=1e-3, atol=1e-4*max|ref|: {tol_ok}")  # fmt: skip
    sp = forward_speed(cfg, variables, iters=args.iters)
    peak = _peak_gflops()
    print(f"forward 320, batch 1: {sp['s_per_img']:.3f} s/img (compile {sp['compile_s']:.1f} s), "
          f"{sp['gflops']:.0f} GFLOP/s = {100 * sp['gflops'] / peak:.0f}% of the measured "
          f"{peak:.0f} GFLOP/s matmul peak")  # fmt: skip
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


def cmd_train(args, cfg) -> int:
    from m2det_jax.sharding import initialize_distributed

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from m2det_jax.train import NonFiniteLossError, train_and_evaluate

    try:
        result = train_and_evaluate(cfg, args.workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if result["preempted"]:
        return 0
    m = result["eval_metrics"]
    if m:
        print("final COCO metrics: " + ", ".join(
            f"{k} {m[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in m))
    return 0


def cmd_eval(args, cfg) -> int:
    from m2det_jax.evaluate import evaluate_variables

    variables = _load_checkpoint(args.checkpoint, cfg)
    os.makedirs(args.workdir, exist_ok=True)
    m = evaluate_variables(cfg, variables, workdir=args.workdir)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
                     indent=1))  # fmt: skip
    return 0


def cmd_summary(args, cfg) -> int:
    from m2det_jax.stats import model_summary

    print(json.dumps(model_summary(cfg)))
    return 0


def _int_list(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()


def _load_checkpoint(path: str, cfg):
    from m2det_jax.checkpoints import ConfigMismatchError, load_variables

    try:
        return load_variables(path, cfg)
    except (ConfigMismatchError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_detect(args, cfg) -> int:
    from m2det_jax.inference import detect_files

    variables = _load_checkpoint(args.checkpoint, cfg)
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    try:
        results = detect_files(
            cfg, variables, args.input, args.output, score_threshold=args.score_threshold,
            class_names=names, batch_size=args.batch,
            tta_sizes=_int_list(args.tta_sizes) or tuple(cfg.tta.sizes),
            tta_flip=args.tta_flip or bool(cfg.tta.flip))  # fmt: skip
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(results)} images -> {os.path.join(args.output, 'detections.json')}")
    return 0


def cmd_export(args, cfg) -> int:
    from m2det_jax.export import export

    variables = _load_checkpoint(args.checkpoint, cfg)
    info = export(cfg, variables, args.output, bf16=args.bf16, batch=args.batch,
                  serving=args.serving)  # fmt: skip
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def cmd_benchmark(args, cfg) -> int:
    from m2det_jax.benchmark import format_table, run_benchmark

    variables = _load_checkpoint(args.checkpoint, cfg) if args.checkpoint else None
    result = run_benchmark(cfg, variables, batch=args.batch, iters=args.iters)
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m2det", description="M2Det in JAX/Flax. Config overrides: --config.a.b=value"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_, fn, config_default="configs/m2det320_vgg.py"):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=config_default, help="config file (.py)")
        sp.add_argument("--workdir", default="workdir", help="output directory")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("convert", "official PyTorch checkpoint / ImageNet backbone -> orbax", cmd_convert)
    sp.add_argument("--checkpoint", required=True, help=".pth or .npz state_dict")
    sp.add_argument("--output", default=None, help="checkpoint dir (default WORKDIR/converted)")
    sp = add("verify", "parity with the original on the shipped reference + speed", cmd_verify)
    sp.add_argument("--iters", type=int, default=5)
    add("summary", "params, GMACs per image and priors of a config", cmd_summary)
    sp = add("train", "train (resumes from WORKDIR/checkpoints if present)", cmd_train,
             "configs/shapes.py")  # fmt: skip
    sp.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    sp.add_argument("--num_processes", type=int, default=None)
    sp.add_argument("--process_id", type=int, default=None)
    sp = add("eval", "COCO metrics of a checkpoint on cfg.data.eval_split", cmd_eval)
    sp.add_argument("--checkpoint", required=True,
                    help="variables checkpoint (m2det convert / export) or a train workdir")
    sp = add("detect", "images / a folder / a glob -> images with boxes + detections.json",
             cmd_detect)  # fmt: skip
    sp.add_argument("--checkpoint", required=True,
                    help="variables checkpoint (m2det convert / export) or a train workdir")
    sp.add_argument("--input", required=True, help="image file, folder or glob pattern")
    sp.add_argument("--output", required=True, help="output folder")
    sp.add_argument("--score_threshold", type=float, default=0.3,
                    help="drawn / written detections (NMS uses cfg.postprocess)")
    sp.add_argument("--class_names", default=None,
                    help="comma-separated names of classes 1..C-1 (default 'class k')")
    sp.add_argument("--batch", type=int, default=1, help="images per forward pass")
    sp.add_argument("--tta_sizes", default=None,
                    help="multi-scale test-time augmentation, e.g. 320,384,448 "
                         "(default: --config.tta.sizes)")
    sp.add_argument("--tta_flip", action="store_true",
                    help="add horizontally flipped passes (or --config.tta.flip=True)")
    sp = add("export", "inference checkpoint + serving artefact (jax.export or TF SavedModel)",
             cmd_export)  # fmt: skip
    sp.add_argument("--checkpoint", required=True,
                    help="variables checkpoint (m2det convert / export) or a train workdir")
    sp.add_argument("--output", required=True, help="output folder")
    sp.add_argument("--bf16", action="store_true", help="store weights as bfloat16")
    sp.add_argument("--batch", type=int, default=0,
                    help="serving batch size (0: symbolic for jax.export, 1 for savedmodel)")
    sp.add_argument("--serving", choices=("auto", "jax", "savedmodel", "none"), default="jax",
                    help="serving artefact: jax.export (default), TF SavedModel with a fixed "
                         "batch (needs the savedmodel extra), auto (SavedModel when "
                         "importable, else jax.export) or none")
    sp = add("benchmark", "speed as the paper measures it (batch 1, net + NMS) + throughput",
             cmd_benchmark)  # fmt: skip
    sp.add_argument("--checkpoint", default=None, help="variables (default: random weights)")
    sp.add_argument("--batch", type=int, default=8, help="throughput batch size")
    sp.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    _set_xla_flags()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    cfg = _load(args, overrides)
    return int(args.fn(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
