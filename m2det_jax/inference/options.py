"""Command-line options shared by `m2det eval`, `detect` and `export`: the run-time NMS
choices (`--classes`, `--max_det`, `--agnostic`, config `postprocess.*`) and `--best`
(a training workdir's best evaluated weights, `train.best_metric`)."""

from __future__ import annotations

import os

from m2det_jax.checkpoints.variables import read_labels
from m2det_jax.config import run_config_file
from m2det_jax.inference.image_files import class_ids
from m2det_jax.paths import join


def nms_flags(sp) -> None:
    """--classes, --max_det, --agnostic: run-time NMS choices (config postprocess.*)."""
    sp.add_argument("--classes", default=None,
                    help="detect only these classes: names or ids, comma-separated (the "
                         "others never enter the NMS; postprocess.classes)")
    sp.add_argument("--max_det", type=int, default=0,
                    help="at most this many detections per image, highest scores "
                         "(postprocess.max_per_image; 0: the config's)")
    sp.add_argument("--agnostic", action="store_true",
                    help="class-agnostic NMS: one NMS over all classes per image "
                         "(postprocess.class_agnostic)")
    sp.add_argument("--best", action="store_true",
                    help="--checkpoint WORKDIR: its best evaluated weights (WORKDIR/best, "
                         "train.best_metric) instead of the newest")


def use_best(args) -> None:
    """--best: the checkpoint becomes WORKDIR/best (train.best_metric), the config stays
    the workdir's."""
    if not getattr(args, "best", False):
        return
    best = join(args.checkpoint, "best")
    if not best.is_dir():
        raise SystemExit(f"error: --best: no {best} (the run needs train.best_metric and an "
                         "evaluation)")  # fmt: skip
    args.config = args.config or run_config_file(args.checkpoint)
    args.checkpoint = os.fspath(best)


def nms_overrides(args) -> list[str]:
    """--classes, --max_det, --agnostic as config overrides (eval, export; detect passes
    them to `Detector`)."""
    out = []
    if args.classes:
        names = (read_labels(args.checkpoint) or {}).get("class_names")
        try:
            ids = class_ids(args.classes, names)
        except ValueError as e:
            raise SystemExit(f"error: --classes: {e}") from None
        out.append(f"postprocess.classes={tuple(sorted(ids))}")
    if args.max_det < 0:
        raise SystemExit(f"error: --max_det={args.max_det}: must be >= 0")
    if args.max_det:
        out.append(f"postprocess.max_per_image={args.max_det}")
    if args.agnostic:
        out.append("postprocess.class_agnostic=True")
    return out
