"""The `m2det` command line: parses flags and calls the library, nothing else.

Every subcommand takes `--config path.py` (or a shipped name) plus `--config.a.b=value`
overrides. `--xla_cpu_conv_flags` (or M2DET_XLA_CPU_CONV_FLAGS=1) opts in to
`perf.runtime.CPU_CONV_FLAGS` before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from m2det_jax import data
from m2det_jax.checkpoints.torch_convert import convert_torch_state_dict
from m2det_jax.checkpoints.variables import load_variables, read_labels, save_variables
from m2det_jax.config import load_config, run_config_file, shipped_configs
from m2det_jax.distributed import initialize_distributed
from m2det_jax.errors import CheckpointMismatchError, ConfigMismatchError, NonFiniteLossError
from m2det_jax.evaluation.driver import evaluate_variables
from m2det_jax.inference.api import Detector
from m2det_jax.inference.export import export
from m2det_jax.inference.image_files import class_ids, detect_files
from m2det_jax.inference.options import nms_flags, nms_overrides, use_best
from m2det_jax.inference.video import detect_video, is_video_source
from m2det_jax.paths import as_path, as_str, join
from m2det_jax.perf import runtime
from m2det_jax.perf.benchmark import format_table, run_benchmark
from m2det_jax.perf.costs import format_cost_table, time_train_step, train_step_cost
from m2det_jax.perf.stats import count_params, model_summary
from m2det_jax.perf.verify import verify_reference
from m2det_jax.train.browse import browse
from m2det_jax.train.curves import plot_curves
from m2det_jax.train.loop import train_and_evaluate


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


def _config_path(args) -> str:
    """--config, else the config.json next to --checkpoint (a training workdir or an
    `m2det export` folder: the config it was trained with), else the command's default."""
    if args.config:
        return args.config
    run = run_config_file(args.checkpoint) if getattr(args, "checkpoint", None) else None
    if run:
        print(f"config: {run} (the checkpoint's; --config to choose another)", file=sys.stderr)
        return run
    return args.config_default


def _load(args, overrides):
    try:
        return load_config(_config_path(args), overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def _load_checkpoint(path: str, cfg, allow_config_mismatch: bool = False):
    try:
        return load_variables(path, cfg, allow_config_mismatch=allow_config_mismatch)
    except (ConfigMismatchError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def _int_list(text: str | None, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip()) if text else ()
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise SystemExit(f"error: {flag}={text!r}: expected comma-separated positive integers")
    return values


def cmd_convert(args, cfg) -> int:
    try:
        variables = convert_torch_state_dict(args.checkpoint, cfg)
    except (CheckpointMismatchError, ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    if set(variables.get("params", {})) == {"backbone"}:
        print("backbone-only weights (ImageNet init): saving the backbone subtree")
    out = as_str(args.output or join(args.workdir, "converted"))
    labels = data.known_labels(int(cfg.model.num_classes))  # COCO / VOC names for official weights
    save_variables(out, variables, cfg, source=as_str(args.checkpoint), labels=labels)
    print(f"converted {count_params(variables['params']):,} parameters -> {out}")
    return 0


def cmd_verify(args, cfg) -> int:
    try:
        return 0 if verify_reference(cfg, iters=args.iters) else 1
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_train(args, cfg) -> int:
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
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
        print("final metrics: " + ", ".join(f"{k} {m[k]:.4f}" for k in (
            "mAP", "AP", "AP50", "AP75", "APs", "APm", "APl") if k in m))  # VOC or COCO
    return 0


def cmd_eval(args, cfg) -> int:
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    variables = _load_checkpoint(args.checkpoint, cfg, args.allow_config_mismatch)
    as_path(args.workdir).mkdir(parents=True, exist_ok=True)
    try:
        m = evaluate_variables(cfg, variables, workdir=args.workdir,
                               results_file=args.save_results,
                               plots_dir=join(args.workdir, "plots") if args.plots else None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
                     indent=1))  # fmt: skip
    return 0


def cmd_plot(args, cfg) -> int:
    run = args.run or args.workdir
    try:
        path = plot_curves(run, args.output)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(path)
    return 0


def cmd_browse(args, cfg) -> int:
    try:
        written = browse(cfg, join(args.workdir, "browse"), batches=args.batches,
                         max_images=args.max_images)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    report = json.loads((join(args.workdir, "browse") / "report.json").read_text())
    print(report["verdict"])
    for k, v in written.items():
        print(f"{k}: {v}")
    return 0


def cmd_summary(args, cfg) -> int:
    if not args.all:
        print(json.dumps(model_summary(cfg)))
        return 0
    print("| config | dataset | classes | input | params | GMACs | priors |")
    print("|---|---|---|---|---|---|---|")
    for name, path in shipped_configs().items():
        c = load_config(path)
        s = model_summary(c)
        print(f"| {name} | {c.data.dataset} | {c.model.num_classes} | {c.model.input_size} | "
              f"{s['params']:,} | {s['gmacs']:.2f} | {s['priors']:,} |", flush=True)
    return 0


def cmd_detect(args, cfg) -> int:
    variables = _load_checkpoint(args.checkpoint, cfg, args.allow_config_mismatch)
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    names = names or (read_labels(args.checkpoint) or {}).get("class_names")
    try:
        classes = class_ids(args.classes, names)
    except ValueError as e:
        raise SystemExit(f"error: --classes: {e}") from None
    tta_sizes = _int_list(args.tta_sizes, "--tta_sizes") or tuple(cfg.tta.sizes)
    detector = Detector(cfg, variables, class_names=names, score_threshold=args.score_threshold,
                        batch_size=args.batch, tta_sizes=tta_sizes,
                        tta_flip=args.tta_flip or bool(cfg.tta.flip), classes=classes,
                        max_det=args.max_det, agnostic=args.agnostic,
                        exif=args.exif)  # fmt: skip
    try:
        if is_video_source(args.input):
            r = detect_video(detector, args.input, args.output, max_frames=args.max_frames,
                             show=args.show)  # fmt: skip
            print(f"{r['frames']} frames ({r['skipped_frames']} skipped) -> {r['video']}, "
                  f"{r['jsonl']}" + (" (interrupted)" if r["interrupted"] else ""))
            return 0
        results = detect_files(detector, args.input, args.output)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(results)} images -> {join(args.output, 'detections.json')}")
    return 0


def cmd_export(args, cfg) -> int:
    variables = _load_checkpoint(args.checkpoint, cfg, args.allow_config_mismatch)
    info = export(cfg, variables, args.output, bf16=args.bf16, batch=args.batch,
                  serving=args.serving, labels=read_labels(args.checkpoint))  # fmt: skip
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def cmd_benchmark(args, cfg) -> int:
    if args.train:  # the train step's measured cost (perf/costs.py), not inference
        batch = args.batch or 16
        if args.no_run:
            row = train_step_cost(cfg, batch)
        else:
            row = time_train_step(cfg, batch, args.iters, peak_tflops=args.peak_tflops)
        print(format_cost_table([row]))
        return 0
    variables = None
    if args.checkpoint:
        variables = _load_checkpoint(args.checkpoint, cfg, args.allow_config_mismatch)
    result = run_benchmark(cfg, variables, batch=args.batch or 8, iters=args.iters)
    print(format_table(result))
    return 0


def _distributed_flags(sp) -> None:
    """jax.distributed flags (auto-detected on TPU pods and SLURM when left out)."""
    sp.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    sp.add_argument("--num_processes", type=int, default=None)
    sp.add_argument("--process_id", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m2det", description="M2Det in JAX/Flax. Config overrides: --config.a.b=value"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_, fn, config_default="configs/m2det320_vgg.py"):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=None,
                        help=f"config file (.py), shipped name or a run's config.json (default: "
                             f"the checkpoint's config.json if it has one, else "
                             f"{config_default})")  # fmt: skip
        sp.add_argument("--workdir", default="workdir", help="output directory")
        sp.add_argument("--xla_cpu_conv_flags", action="store_true",
                        help="XLA:CPU with YNNPACK fusions off (runtime.CPU_CONV_FLAGS): "
                             "faster convolutions on the CPUs we measured; measure yours "
                             "(python benchmarks/forward.py)")  # fmt: skip
        sp.add_argument("--allow_config_mismatch", action="store_true",
                        help="load a checkpoint written with another input size, anchors "
                             "or preprocessing (refused by default: outputs differ)")  # fmt: skip
        sp.set_defaults(fn=fn, config_default=config_default)
        return sp

    sp = add("convert", "official PyTorch checkpoint / ImageNet backbone -> orbax", cmd_convert)
    sp.add_argument("--checkpoint", required=True, help=".pth or .npz state_dict")
    sp.add_argument("--output", default=None, help="checkpoint dir (default WORKDIR/converted)")
    sp = add("verify", "parity with the original on the shipped reference + speed", cmd_verify)
    sp.add_argument("--iters", type=int, default=5)
    sp = add("plot", "training curves of a run (metrics.jsonl) -> one PNG", cmd_plot)
    sp.add_argument("run", nargs="?", default=None, help="the run's workdir (or --workdir)")
    sp.add_argument("--output", default=None, help="the PNG (default RUN/curves.png)")
    sp = add("summary", "params, GMACs per image and priors of a config", cmd_summary)
    sp.add_argument("--all", action="store_true", help="a table of every shipped config")
    sp = add("browse", "augmented training batches with boxes + a data report (class counts, "
             "box sizes vs priors, matched priors per object, a verdict) in WORKDIR/browse",
             cmd_browse, "configs/shapes.py")  # fmt: skip
    sp.add_argument("--batches", type=int, default=2, help="training batches drawn")
    sp.add_argument("--max_images", type=int, default=2000,
                    help="training images the statistics read (the first ones)")
    sp = add("train", "train (resumes from WORKDIR/checkpoints if present)", cmd_train,
             "configs/shapes.py")  # fmt: skip
    _distributed_flags(sp)
    sp = add("eval", "COCO or VOC metrics of a checkpoint on cfg.data.eval_split", cmd_eval)
    sp.add_argument("--checkpoint", required=True,
                    help="variables checkpoint (m2det convert / export) or a train workdir")
    sp.add_argument("--save_results", default=None,
                    help="also write every detection as a COCO results JSON here (a split "
                         "without labels is then predicted and written, not scored)")
    sp.add_argument("--plots", action="store_true",
                    help="write PR curves, a confusion matrix, a per-class table and the "
                         "worst images to WORKDIR/plots (COCO metric)")
    nms_flags(sp)
    _distributed_flags(sp)
    sp = add("detect", "images / a folder / a glob -> images with boxes + detections.json",
             cmd_detect)  # fmt: skip
    sp.add_argument("--checkpoint", required=True,
                    help="variables checkpoint (m2det convert / export) or a train workdir")
    sp.add_argument("--input", required=True,
                    help="image file, folder or glob; a video file, camera index (0) or "
                         "stream URL")  # fmt: skip
    sp.add_argument("--output", required=True, help="output folder")
    sp.add_argument("--score_threshold", type=float, default=0.3,
                    help="drawn / written detections (NMS uses cfg.postprocess)")
    sp.add_argument("--class_names", default=None,
                    help="comma-separated names of classes 1..C-1 (default 'class k')")
    sp.add_argument("--batch", type=int, default=1, help="images per forward pass")
    nms_flags(sp)
    sp.add_argument("--exif", action="store_true",
                    help="turn images as their EXIF orientation says (phone photos)")
    sp.add_argument("--max_frames", type=int, default=0, help="video: stop after N frames")
    sp.add_argument("--show", action="store_true", help="video: show frames in a window")
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
                    help="serving batch size (0: symbolic for jax.export, 1 for savedmodel "
                         "and onnx)")
    sp.add_argument("--serving", choices=("auto", "jax", "savedmodel", "onnx", "none"),
                    default="jax",
                    help="serving artefact: jax.export (default), TF SavedModel with a fixed "
                         "batch (needs the savedmodel extra), onnx (network + decode, fixed "
                         "batch, NMS outside; needs the onnx extra), auto (SavedModel when "
                         "importable, else jax.export) or none")
    nms_flags(sp)
    sp = add("benchmark", "speed as the paper measures it (batch 1, net + NMS) + throughput",
             cmd_benchmark)  # fmt: skip
    sp.add_argument("--checkpoint", default=None, help="variables (default: random weights)")
    sp.add_argument("--batch", type=int, default=None,
                    help="throughput batch size (default 8; with --train the per-device "
                         "train batch, default 16)")
    sp.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    sp.add_argument("--train", action="store_true",
                    help="cost of one train step on one device instead: FLOPs per image and "
                         "memory from the compiled step, then its speed and MFU")
    sp.add_argument("--no_run", action="store_true", help="with --train: compile only")
    sp.add_argument("--peak_tflops", type=float, default=None,
                    help="with --train: the device peak for the MFU (default: costs.PEAK_TFLOPS "
                         "for the device and model.dtype)")
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def _show_library_messages() -> None:
    """The library reports through the `m2det_jax` logger (unconfigured, its warnings still
    reach stderr); the command shows its INFO lines too: resumes, evaluations, data counts."""
    log = logging.getLogger("m2det_jax")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_library_messages()
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.xla_cpu_conv_flags or os.environ.get("M2DET_XLA_CPU_CONV_FLAGS") == "1":
        if not runtime.use_cpu_conv_flags():  # before any JAX computation
            print("warning: --xla_cpu_conv_flags: this jaxlib does not know the flag; "
                  "ignored", file=sys.stderr)  # fmt: skip
    use_best(args)
    extra = nms_overrides(args) if args.fn in (cmd_eval, cmd_export) else []
    cfg = _load(args, overrides + extra)
    return int(args.fn(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
