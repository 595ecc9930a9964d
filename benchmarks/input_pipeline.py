"""Input pipeline throughput: images/s per core, ours beside the original's, interleaved.

    python benchmarks/input_pipeline.py --coco_like                 # the issue's table
    python benchmarks/input_pipeline.py --coco_like --original /path/to/M2Det
    python benchmarks/input_pipeline.py --sizes 320 --workers 0 1 2 --batches 20

`--coco_like` writes a COCO-format folder of 300 JPEGs of 640x480 (COCO's typical size;
smooth colour fields, 2-12 filled boxes, sensor-like noise, quality 90, ~115 KB each)
with its instances JSON into --data_dir, and builds it through the `coco_folder` builder
(`data.open_builder`). Without it the shapes set (128 px) is used.

For every input size, in interleaved rounds (best round reported), one core each
(the process is pinned to one CPU for the 0-worker figures):
  * ours, train: `make_train_iterator(num_workers=0)`: decode + full augmentation + batch;
  * ours, train (device aug.): the host part of `data.augment_on_device` (decode + canvas)
    and, on its own line, the jitted on-device augmentation on this machine's backend;
  * ours, eval: `make_eval_iterator(num_workers=0)`: decode + resize + batch;
  * the original (with `--original`, a checkout of qijiezhao/M2Det): `cv2.imread` +
    `data_augment.preproc(size, means, 0.6)` for training and `cv2.imread` +
    `BaseTransform(size, means)` for evaluation, over the same files.
Then the train and eval iterators with 1 and 2 grain worker processes (unpinned: the
total rate of the process and its workers).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import random
import sys
import time
import types

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from m2det_jax.config import default_config
from m2det_jax.data import augment_device as device_augment
from m2det_jax.data import augment_host as augment
from m2det_jax.data import open_builder, pipeline
from m2det_jax.perf.runtime import cpu_model

MEANS_BGR = (104, 117, 123)


def make_coco_like(root: str, n: int = 300, h: int = 480, w: int = 640, seed: int = 0) -> tuple:
    """(image_dir, annotation_file) of a generated COCO-format folder (reused if present)."""
    image_dir, ann = os.path.join(root, "images"), os.path.join(root, "instances.json")
    if os.path.exists(ann):
        return image_dir, ann
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        img = cv2.resize(rng.integers(0, 256, (6, 8, 3), np.uint8), (w, h),
                         interpolation=cv2.INTER_CUBIC)  # fmt: skip
        for _ in range(int(rng.integers(2, 13))):
            bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), colour, -1)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "bbox": [x, y, bw, bh],
                         "category_id": int(rng.integers(1, 4)), "area": bw * bh,
                         "iscrowd": 0})  # fmt: skip
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        name = f"{i:06d}.jpg"
        cv2.imwrite(os.path.join(image_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    cats = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)]
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return image_dir, ann


def _rate(make, cfg, batches: int, **kwargs) -> float:
    """Images/s of `batches` batches of `make(cfg, **kwargs)` after one warm-up batch
    (worker start-up, first reads)."""
    it = make(cfg, **kwargs)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += int(b["mask"].sum())
    rate = n / (time.perf_counter() - t0)
    del it
    gc.collect()
    return rate


def _original(path: str):
    """The original's data_augment module from a checkout (torchvision stubbed if absent:
    preproc does not use it)."""
    sys.path.insert(0, path)
    try:
        importlib.import_module("torchvision")
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms})
    # By file: the checkout's data/__init__.py imports its dataset classes (and their deps).
    spec = importlib.util.spec_from_file_location(
        "original_data_augment", os.path.join(path, "data", "data_augment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _original_rates(da, files, targets, size: int, n: int) -> tuple[float, float]:
    """(train, eval) images/s of the original's imread + preproc / BaseTransform."""
    random.seed(0)
    train, test = da.preproc(size, MEANS_BGR, 0.6), da.BaseTransform(size, MEANS_BGR)
    t0 = time.perf_counter()
    for i in range(n):
        train(cv2.imread(files[i % len(files)]), targets[i % len(files)].copy())
    tr = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        test(cv2.imread(files[i % len(files)]))
    return tr, n / (time.perf_counter() - t0)


def _targets(ann_file: str, image_dir: str):
    with open(ann_file) as f:
        d = json.load(f)
    files = {im["id"]: os.path.join(image_dir, im["file_name"]) for im in d["images"]}
    rows: dict[int, list] = {i: [] for i in files}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        rows[a["image_id"]].append([x, y, x + w - 1, y + h - 1, a["category_id"]])
    ids = sorted(files)
    return [files[i] for i in ids], [np.array(rows[i], np.float32) for i in ids]


def _device_rate(cfg, builder, batch: int, rounds: int = 5) -> float:
    """Images/s of the jitted on-device augmentation (this backend) on real canvases."""
    it = pipeline.make_train_iterator(cfg, builder=builder, global_batch_size=batch,
                                      num_workers=0, shard_index=0, shard_count=1)  # fmt: skip
    b = {k: jnp.asarray(v) for k, v in next(it).items()}
    pp = cfg.preprocess
    fn = jax.jit(lambda key, b: device_augment.augment_batch(
        key, b["image"], b["canvas_sizes"], b["boxes"], b["labels"], b["valid"],
        size=int(cfg.model.input_size), expand_prob=float(cfg.data.expand_prob),
        fill_rgb=augment.fill_rgb_from(pp.channel_order, pp.pixel_means))["image"])  # fmt: skip
    jax.block_until_ready(fn(jax.random.key(0), b))
    best = 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(r + 1), b))
        best = max(best, batch / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coco_like", action="store_true", help="COCO-size JPEG folder")
    p.add_argument("--original", default="", help="a checkout of qijiezhao/M2Det")
    p.add_argument("--data_dir", default=os.path.join("/tmp", "m2det_bench_input"))
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    tfds.disable_progress_bar()
    cfg = default_config()
    cfg.data.data_dir = args.data_dir
    if args.coco_like:
        image_dir, ann = make_coco_like(os.path.join(args.data_dir, "coco_like"))
        cfg.data.dataset = "coco_folder"
        cfg.data.image_dir, cfg.data.annotation_file = image_dir, ann
        cfg.data.eval_image_dir, cfg.data.eval_annotation_file = image_dir, ann
        files, targets = _targets(ann, image_dir)
    else:
        cfg.data.dataset = "shapes"
    cfg.model.num_classes = 81
    builder = open_builder(cfg)
    da = _original(args.original) if args.original and args.coco_like else None
    cores = sorted(os.sched_getaffinity(0))
    print(f"CPU: {cpu_model()}, {len(cores)} cores; cv2 {cv2.__version__}; jax "
          f"{jax.__version__} ({jax.devices()[0].platform}); dataset {cfg.data.dataset}, "
          f"batch {args.batch_size}, {args.batches} batches, best of {args.rounds}")  # fmt: skip
    n = args.batch_size * args.batches
    common = dict(builder=builder, global_batch_size=args.batch_size, shard_index=0,
                  shard_count=1, num_workers=0)  # fmt: skip
    train, evaluate, nb = pipeline.make_train_iterator, pipeline.make_eval_iterator, args.batches
    header = f"{'images/s per core':38s}" + "".join(f"{s:>10d}" for s in args.sizes)
    rows: dict[str, list[float]] = {}
    os.sched_setaffinity(0, {cores[0]})  # one core for the in-process figures
    for size in args.sizes:
        c = cfg.copy_and_resolve_references()
        c.model.input_size = size
        dev = c.copy_and_resolve_references()
        dev.data.augment_on_device = True
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            figures = {
                "ours, train (host augmentation)": _rate(train, c, nb, **common),
                "ours, train (device aug.: host part)": _rate(train, dev, nb, **common),
                "ours, eval (decode + resize)": _rate(evaluate, c, nb, **common),
            }
            if da is not None:
                tr, ev = _original_rates(da, files, targets, size, n)
                figures["original, train (imread + preproc)"] = tr
                figures["original, eval (imread + BaseTransform)"] = ev
            for k, v in figures.items():
                best[k] = max(best.get(k, 0.0), v)
        best["device aug. alone, jitted on this CPU"] = _device_rate(dev, builder, args.batch_size)
        for k, v in best.items():
            rows.setdefault(k, []).append(v)
    os.sched_setaffinity(0, set(cores))
    print(header)
    for k, v in rows.items():
        print(f"{k:38s}" + "".join(f"{x:10.1f}" for x in v))
    print(f"\ngrain worker processes (all {len(cores)} cores, images/s in total), size "
          f"{args.sizes[0]}:")  # fmt: skip
    c = cfg.copy_and_resolve_references()
    c.model.input_size = args.sizes[0]
    for w in args.workers:
        common["num_workers"] = w
        tr, ev = _rate(train, c, nb, **common), _rate(evaluate, c, nb, **common)
        print(f"  workers={w}: train {tr:7.1f}   eval {ev:7.1f}", flush=True)


if __name__ == "__main__":
    main()
