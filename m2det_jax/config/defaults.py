"""Every config default, once: `default_config()` (M2Det320-VGG as the official code configures
it) and the VOC0712 setting. Config files start from `default_config()` and override it.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All defaults: M2Det320-VGG as the official code configures it (docs/original.md)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "vgg16"  # one of BACKBONES
    c.model.input_size = 320
    c.model.num_classes = 81  # including background 0
    c.model.planes = 256  # TUM width (paper Table 3: 8 TUMs x 256 ch)
    c.model.num_levels = 8  # number of TUMs
    c.model.num_scales = 6  # outputs per TUM
    c.model.smooth = True  # 1x1 smooth convs on TUM outputs
    c.model.sfam = False  # all official configs train without SFAM
    c.model.share_ffmv2 = True  # original: one FFMv2 ("leach") module for all levels
    c.model.share_sfam = True  # original: one SE pair for all scales
    c.model.sfam_reduction = 16
    c.model.resnet_layer3_stride = 1  # the original builds layer3 with stride 1
    c.model.resnet_width = 64  # ResNet stem/layer1 width; torchvision and the original: 64
    c.model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision)
    c.model.bn_momentum = 0.99  # Flax convention; PyTorch momentum 0.01 (BasicConv)
    c.model.norm_momentum = 0.9  # `Norm` and ResNet BN: PyTorch momentum 0.1

    c.anchors = ml_collections.ConfigDict()
    # None -> priors.SIZE_PATTERNS / priors.STEPS for the shipped sizes, derived otherwise.
    c.anchors.size_pattern = ml_collections.FieldReference(None, field_type=tuple)
    c.anchors.steps = ml_collections.FieldReference(None, field_type=tuple)
    c.anchors.aspect_ratios = (2, 3)
    c.anchors.variance = (0.1, 0.2)
    c.anchors.clip = True

    c.preprocess = ml_collections.ConfigDict()
    c.preprocess.channel_order = "bgr"  # the original feeds BGR
    c.preprocess.pixel_means = (104.0, 117.0, 123.0)  # in channel_order
    c.preprocess.pixel_scale = 1.0  # x = (pixels - means) / scale

    c.loss = ml_collections.ConfigDict()
    c.loss.overlap_thresh = 0.5
    c.loss.neg_pos = 3

    c.postprocess = ml_collections.ConfigDict()
    c.postprocess.method = "soft_linear"  # one of POSTPROCESS_METHODS
    c.postprocess.iou_threshold = 0.3  # the Nt the original really uses (docs/original.md §5)
    c.postprocess.sigma = 0.5  # gaussian soft-NMS only
    c.postprocess.score_threshold = 0.1  # candidate threshold (strictly greater)
    c.postprocess.min_score = 0.001  # soft-NMS discard floor
    c.postprocess.keep_per_class = 50
    c.postprocess.max_per_image = 0  # 0 = no cap (original)
    c.postprocess.candidates_per_class = 1000
    c.postprocess.pixel_offset = 1  # 1 = the original's +1-pixel IoU
    # Beyond the original: one NMS over all classes per image (each prior with its best
    # class; rows: max_per_image, or keep_per_class when 0), and a class filter (ids
    # 1..C-1 that may be detected; empty: all). `inference.postprocess.agnostic`.
    c.postprocess.class_agnostic = False
    c.postprocess.classes = ()

    # Test-time augmentation for `m2det eval`, training's evaluation and `m2det detect`
    # (the paper's multi-scale setting): the input sizes to run (empty: only
    # model.input_size, no TTA) and horizontally flipped passes; every pass's candidates
    # are merged and suppressed once more with `postprocess`.
    c.tta = ml_collections.ConfigDict()
    c.tta.sizes = ()
    c.tta.flip = False

    c.eval = ml_collections.ConfigDict()
    # Training's final evaluation also writes WORKDIR/plots (PR curves, confusion matrix,
    # per-class table, worst images; COCO metric): `evaluation.pictures`.
    c.eval.plots = True
    # COCO metric backend: "faster_coco_eval" (same numbers, several times faster) or
    # "pycocotools" (the reference).
    c.eval.backend = "faster_coco_eval"
    # Fold each conv -> BatchNorm pair for inference (`models.fold_batchnorm`) in evaluation,
    # `m2det detect` and `m2det export`: outputs equal up to float32 rounding. Off by
    # default: XLA already fuses the BatchNorm into the convolution's epilogue.
    c.eval.fold_batchnorm = False
    # Winograd F(4x4, 3x3) for the wide 3x3 convolutions in evaluation, `m2det detect` and
    # `m2det export` (`models.prepare_winograd`): ~4x less arithmetic on those layers,
    # outputs within ~2e-5 of the layer's largest value (float32 transformed kernels).
    # "auto": on when JAX's backend is the CPU and the model float32 (GPU/TPU libraries
    # pick their own algorithms); "on"; "off" (the direct convolution, bit-equal to
    # `model.apply`).
    c.eval.winograd = "auto"
    # Which convolutions Winograd takes (`models.winograd.plan`): input and output channels
    # >= min_channels and output pixels >= min_pixels. Chosen from per-layer timings on
    # XLA:CPU (`python benchmarks/winograd_layers.py` prints them for your machine).
    c.eval.winograd_min_channels = 256
    c.eval.winograd_min_pixels = 400
    # Detections kept per image, compacted on the device before they reach the host
    # (`evaluation.compact_detections`): the highest-scoring ones. 0 keeps every valid row
    # (the original's evaluation: no per-image cap); 100 is COCO's submission rule.
    c.eval.max_detections = 0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global batch: 16 per GPU x 4 GPUs (original README)
    c.train.base_lr = 0.004
    c.train.warmup_start_lr = 1e-6
    c.train.warmup_epochs = 5
    c.train.lr_epochs = (90, 110, 130, 150, 160)  # step_lr.COCO
    c.train.lr_values = (0.004, 0.002, 0.0004, 0.00004, 0.000004)
    c.train.optimizer = "sgd"  # "sgd" (original) or "adamw"
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.grad_clip_norm = 0.0  # 0: no clipping (original)
    c.train.scale_lr_with_batch = False  # lr x batch_size / reference_batch_size
    c.train.reference_batch_size = 64
    c.train.num_epochs = 160  # max_iter = 160 x epoch_size in the original
    c.train.num_steps = 0  # > 0 overrides num_epochs (steps of the global batch)
    c.train.steps_per_epoch = 0  # 0: dataset size // batch_size
    c.train.seed = 0
    c.train.log_every = 50  # steps between metrics rows / TensorBoard scalars
    c.train.checkpoint_every = 1000  # steps between (async) checkpoints
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # steps between evaluations (0: only at the end, < 0: never)
    # Exponential moving average of the weights (params and BatchNorm statistics), used by
    # evaluation, detect and export when on: 0 = off; e.g. 0.999. The decay ramps up as
    # min(ema_decay, (1 + n) / (10 + n)) over the first updates n. `train.ema`.
    c.train.ema_decay = 0.0
    # Keep the best evaluated weights in <workdir>/best (an `m2det eval/detect/export
    # --best` checkpoint): a metric name such as "AP", "AP50" or "mAP"; "" = off.
    c.train.best_metric = ""
    # Stop after this many evaluations in a row without a better best_metric (0: never).
    c.train.early_stop_patience = 0
    # Resume even if anchors, input size, preprocessing or loss settings differ from the
    # checkpoint's (refused by default: checkpoints.OUTPUT_FIELDS, TRAINING_FIELDS).
    c.train.allow_config_mismatch = False
    # A step whose loss or gradients are NaN/inf: False stops the run before anything
    # non-finite is saved (naming the step and the last good checkpoint); True skips that
    # update (counted as skipped_steps) and trains on.
    c.train.skip_nonfinite_steps = False
    c.train.init_checkpoint = ""  # `m2det convert` output: full model or backbone only
    # (start, stop): a jax.profiler trace of steps start..stop-1 in <workdir>/profile.
    c.train.profile_steps = (0, 0)
    c.train.remat = "none"  # activation rematerialisation, one of REMAT_MODES
    c.train.grad_accum_steps = 1  # microbatches per step (scan); 1: the plain step
    # TFLOP/s per device the logged MFU is measured against; 0: the known peak of the
    # device and model.dtype (m2det_jax.throughput.PEAK_TFLOPS), none on CPUs.
    c.train.peak_tflops = 0.0

    c.data = ml_collections.ConfigDict()
    # "coco/2017", "voc" (VOC07+12), "voc/2007", "voc/2012" (prepared TFDS data, never
    # downloaded), "shapes" (generated on first use), "coco_folder" (built on first use
    # from image_dir + annotation_file), "voc_folder" (built from root) or "yolo_folder"
    # (a YOLO-format folder: yolo_yaml).
    c.data.dataset = "coco/2017"
    c.data.max_boxes = 100  # G: ground truth per image, padded (extra boxes truncated, counted)
    # TFDS data_dir; None: ~/tensorflow_datasets.
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.eval_batch_size = 8  # global; every host gets eval_batch_size / process_count
    c.data.include_crowd = False  # COCO is_crowd boxes: dropped (counted) unless True
    c.data.expand_prob = 0.6  # zoom-out probability (original preproc p)
    # grain worker processes; 0 = in-process; -1 = auto (0 on <= 2 CPUs, else
    # min(8, cpu_count - 1)).
    c.data.num_workers = -1
    # Batches placed on the devices ahead of the step, by a reader thread (0: none; -1:
    # auto, 2 on accelerators and 0 on the CPU backend, where that thread would only take
    # cores from the step: benchmarks/prefetch.py).
    c.data.prefetch = -1
    # Augment on the accelerator inside the jitted train step (`data.augment_device`):
    # the host only decodes and pads onto a device_canvas x device_canvas uint8 canvas
    # (larger images shrunk to fit). Same distributions as the host path, not its bits.
    c.data.augment_on_device = False
    c.data.device_canvas = 640
    # coco_folder only: split "train" from image_dir + annotation_file, and "validation"
    # from eval_image_dir (default image_dir) + eval_annotation_file when that is set.
    c.data.image_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.annotation_file = ml_collections.FieldReference(None, field_type=str)
    c.data.eval_image_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.eval_annotation_file = ml_collections.FieldReference(None, field_type=str)
    # voc_folder only: the VOC-format folder (Annotations/, JPEGImages/, ImageSets/Main/)
    # and its class names, in label order (empty: every name in its XMLs, sorted).
    c.data.root = ml_collections.FieldReference(None, field_type=str)
    c.data.class_names = ()
    # yolo_folder only: the dataset YAML (path, train, val, names) of a YOLO-format folder.
    c.data.yolo_yaml = ml_collections.FieldReference(None, field_type=str)
    # (dataset, split) pairs read after train_split for training, from the same data_dir
    # and with the same classes, e.g. (("voc/2012", "trainval"),) after voc/2007's
    # trainval (what data.dataset "voc" does by itself).
    c.data.extra_train_sets = ()
    # Stop with an error once more than this fraction of the (>= 64) examples read do not
    # decode, instead of training (or spinning) on what is left.
    c.data.max_bad_fraction = 0.5
    c.data.keep_difficult = False  # VOC is_difficult boxes: dropped in training (original)
    # Evaluation metric: "voc" (mAP at IoU 0.5, `m2det_jax.evaluation.voc`), "coco" (the 12
    # COCO numbers) or "auto" (voc for datasets whose objects carry is_difficult).
    c.data.metric = "auto"
    c.data.voc_use_07_metric = True  # VOC2007 11-point AP (the original); False: area (2010+)
    c.data.shapes_image_size = 128  # shapes only: generated image side
    c.data.shapes_num_train = 2000
    c.data.shapes_num_validation = 200
    c.data.shapes_seed = 0
    return c


def voc0712(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The original's VOC0712 setting on `c` (in place; returned): 21 classes, 2007 + 2012
    trainval for training (data.dataset "voc"), 2007 test with the VOC metric,
    step_lr.VOC epochs. With data.dataset=voc_folder the same split names read a
    VOC-format folder's ImageSets/Main/trainval.txt and test.txt."""
    c.model.num_classes = 21  # 20 + background
    c.train.lr_epochs = (100, 150, 200, 250, 300)  # step_lr.VOC
    c.train.num_epochs = 300
    c.data.dataset = "voc"  # voc/2007, trained with voc/2012's trainval appended
    c.data.train_split = "trainval"
    c.data.eval_split = "test"
    c.data.metric = "voc"
    return c
