"""What a config may hold: the allowed values of its enum fields and `validate`, which
checks every value before any work (an error names the field and the value)."""

from __future__ import annotations

from m2det_jax.core.priors import feature_map_sizes, resolve_size_pattern

BACKBONES = ("vgg16", "resnet18", "resnet34", "resnet50", "resnet101")
POSTPROCESS_METHODS = ("soft_linear", "soft_gaussian", "hard")
# train.remat: "none"; "stages" (each backbone stage or block, FFMv1/FFMv2/TUM/SFAM under
# nn.remat: only block boundaries are kept for backward); "dots" (the same blocks, conv /
# matmul outputs kept too); "full" (the whole network under one remat: only its inputs are
# kept, but its backward recomputes everything at once, so the peak does not fall).
# Measured as what the backward holds from the forward (`perf.costs.held_for_backward_bytes`,
# column "held MiB" of `m2det benchmark --config configs/m2det320_vgg.py --train --batch 16
# --no_run --config.train.remat=MODE`; "step GFLOP/img" is the recompute's price): dots
# holds less than none and stages least, for a few more step FLOPs (figures: docs/speed.md).
# XLA:CPU's scheduler recomputes early, so its compiled temp memory does not fall
# (accelerator compilers schedule for memory); train.grad_accum_steps lowers it there too.
REMAT_MODES = ("none", "stages", "dots", "full")
METRICS = ("auto", "coco", "voc")
WINOGRAD_MODES = ("auto", "on", "off")


def validate(cfg) -> None:
    """Raises ValueError naming the field and value of any setting that cannot work."""
    m = cfg.model
    if m.backbone not in BACKBONES:
        raise ValueError(f"model.backbone={m.backbone!r}: expected one of {BACKBONES}")
    if m.num_classes < 2:
        raise ValueError(f"model.num_classes={m.num_classes}: needs background + >=1 class")
    if m.planes < 2 or m.planes % 2:
        raise ValueError(f"model.planes={m.planes}: must be an even number >= 2")
    if m.num_levels < 1:
        raise ValueError(f"model.num_levels={m.num_levels}: must be >= 1")
    if m.num_scales < 3:
        raise ValueError(f"model.num_scales={m.num_scales}: the TUM needs >= 3 scales")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype={m.dtype!r}: expected float32, bfloat16 or float16")
    if m.sfam and m.planes * m.num_levels < m.sfam_reduction:
        raise ValueError(
            f"model.sfam_reduction={m.sfam_reduction} exceeds planes*num_levels="
            f"{m.planes * m.num_levels}"
        )
    if cfg.postprocess.method not in POSTPROCESS_METHODS:
        raise ValueError(
            f"postprocess.method={cfg.postprocess.method!r}: expected one of "
            f"{POSTPROCESS_METHODS}"
        )
    if cfg.postprocess.pixel_offset not in (0, 1):
        raise ValueError(f"postprocess.pixel_offset={cfg.postprocess.pixel_offset}: 0 or 1")
    bad = [k for k in cfg.postprocess.classes
           if not isinstance(k, int) or not 1 <= k < cfg.model.num_classes]
    if bad:
        raise ValueError(f"postprocess.classes={tuple(cfg.postprocess.classes)}: {bad[0]!r} is "
                         f"not a class id 1..{cfg.model.num_classes - 1}")
    ps = tuple(cfg.train.profile_steps)
    if len(ps) != 2 or ps[0] < 0 or (ps[1] and ps[1] <= ps[0]):
        raise ValueError(f"train.profile_steps={ps}: (start, stop), 0 <= start < stop, "
                         "or (0, 0) for none")  # fmt: skip
    remat = cfg.train.remat
    if remat not in REMAT_MODES:
        raise ValueError(f"train.remat={remat!r}: expected one of {REMAT_MODES}")
    k = cfg.train.grad_accum_steps
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"train.grad_accum_steps={k!r}: an integer >= 1")
    peak = cfg.train.peak_tflops
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak >= 0:
        raise ValueError(f"train.peak_tflops={peak!r}: TFLOP/s per device, >= 0 (0: known peak)")
    t = cfg.train
    for field, value in (("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                         ("train.checkpoint_every", t.checkpoint_every),
                         ("train.keep_checkpoints", t.keep_checkpoints),
                         ("data.eval_batch_size", cfg.data.eval_batch_size),
                         ("data.max_boxes", cfg.data.max_boxes)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field}={value!r}: an integer >= 1")
    for field, value in (("train.num_steps", t.num_steps),
                         ("train.steps_per_epoch", t.steps_per_epoch)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{field}={value!r}: an integer >= 0 (0: from the data)")
    ema = t.ema_decay
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
        raise ValueError(f"train.ema_decay={ema!r}: a decay in [0, 1) (0: no EMA)")
    patience = t.early_stop_patience
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"train.early_stop_patience={patience!r}: an integer >= 0 (0: never)")
    if patience and not t.best_metric:
        raise ValueError(f"train.early_stop_patience={patience} needs train.best_metric "
                         "(the metric that must improve, e.g. AP or mAP)")
    if patience and t.eval_every <= 0:
        raise ValueError(f"train.early_stop_patience={patience} needs periodic evaluations: "
                         f"train.eval_every={t.eval_every} (set it > 0)")
    backend = cfg.eval.backend
    cap = cfg.eval.max_detections
    if not isinstance(cap, int) or cap < 0:
        raise ValueError(f"eval.max_detections={cap!r}: expected an integer >= 0 (0: no cap)")
    fold = cfg.eval.fold_batchnorm
    if not isinstance(fold, bool):
        raise ValueError(f"eval.fold_batchnorm={fold!r}: expected True or False")
    wino = cfg.eval.winograd
    if wino not in WINOGRAD_MODES:
        raise ValueError(f"eval.winograd={wino!r}: expected one of {WINOGRAD_MODES}")
    for field in ("winograd_min_channels", "winograd_min_pixels"):
        value = cfg.eval[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"eval.{field}={value!r}: expected an integer >= 1")
    if backend not in ("faster_coco_eval", "pycocotools"):
        raise ValueError(f"eval.backend={backend!r}: expected faster_coco_eval or pycocotools")
    d = cfg.data
    mbf = d.max_bad_fraction
    if isinstance(mbf, bool) or not isinstance(mbf, (int, float)) or not 0 <= mbf <= 1:
        raise ValueError(f"data.max_bad_fraction={mbf!r}: a fraction in [0, 1]")
    if d.metric not in METRICS:
        raise ValueError(f"data.metric={d.metric!r}: expected one of {METRICS}")
    for pair in d.extra_train_sets:
        if len(pair) != 2 or not all(isinstance(v, str) and v for v in pair):
            raise ValueError(f"data.extra_train_sets: {pair!r} is not a (dataset, split) pair")
    if d.prefetch < -1:
        raise ValueError(f"data.prefetch={d.prefetch}: batches ahead, >= 0 (or -1: auto)")
    if d.augment_on_device and d.device_canvas < 1:
        raise ValueError(f"data.device_canvas={d.device_canvas}: a canvas side >= 1")
    if len(cfg.anchors.variance) != 2:
        raise ValueError(f"anchors.variance={cfg.anchors.variance}: two values")
    # Geometry: raises with the offending size if the TUM cannot be built.
    tta = cfg.tta
    if tta is not None:
        sizes = tuple(tta.sizes)
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            raise ValueError(f"tta.sizes={sizes}: positive integer input sizes")
        for v in sizes:  # the TUM must build at every size
            at_size = cfg.copy_and_resolve_references()
            at_size.model.input_size = v
            try:
                feature_map_sizes(at_size)
            except ValueError as e:
                raise ValueError(f"tta.sizes={sizes}: size {v}: {e}") from None

    fm = feature_map_sizes(cfg)
    if cfg.anchors.steps is not None and len(cfg.anchors.steps) != m.num_scales:
        raise ValueError(
            f"anchors.steps has {len(cfg.anchors.steps)} entries; model.num_scales="
            f"{m.num_scales} needs {m.num_scales}"
        )
    resolve_size_pattern(cfg)
    del fm
