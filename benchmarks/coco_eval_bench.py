"""Evaluation's host side: detections -> COCO results -> the 12 metrics, both ways.

  python benchmarks/coco_eval_bench.py                     # 5,000 images x 100 detections
  python benchmarks/coco_eval_bench.py --images 500 --rounds 1

Before: `to_coco_results` (a dict per row) + pycocotools, as evaluation ran before
issue 17. After: `coco_results_array` ([N, 7] array) + faster-coco-eval (what
`evaluate_variables` runs now). The same generated ground truth (COCO-like: 1-15 boxes
per image, 80 classes, ~2 % crowd) and noisy detections in both; the two sides run
alternately for `--rounds`, best of each printed beside the CPU model, and the metrics
of both are checked equal.
"""

import argparse
import time

import numpy as np

from m2det_jax.evaluation.coco import coco_evaluate, coco_results_array, to_coco_results
from m2det_jax.perf.runtime import cpu_model


def make_data(n_images: int, per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cats = list(range(1, 81))
    images, anns = [], []
    boxes = np.zeros((n_images, per_image, 4), np.float32)
    classes = np.ones((n_images, per_image), np.int32)
    for i in range(n_images):
        w, h = 640, 480
        images.append({"id": i + 1, "width": w, "height": h, "file_name": f"{i}.jpg"})
        k = int(rng.integers(1, 16))
        xy = rng.uniform(0, 400, (k, 2))
        wh = rng.uniform(8, 240, (k, 2))
        lab = rng.integers(1, 81, k)
        for j in range(k):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab[j]),
                         "bbox": [*map(float, xy[j]), *map(float, wh[j])],
                         "area": float(wh[j, 0] * wh[j, 1]),
                         "iscrowd": int(rng.random() < 0.02)})  # fmt: skip
        # Detections: jittered copies of the truth, then background clutter.
        src = rng.integers(0, k, per_image)
        xyxy = np.concatenate([xy[src], xy[src] + wh[src]], 1) + rng.normal(0, 6, (per_image, 4))
        clutter = rng.random(per_image) < 0.6
        rand = rng.uniform(0, 400, (per_image, 2))
        xyxy[clutter] = np.concatenate([rand, rand + rng.uniform(8, 200, (per_image, 2))],
                                       1)[clutter]  # fmt: skip
        boxes[i] = xyxy
        classes[i] = np.where(clutter, rng.integers(1, 81, per_image), lab[src])
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in cats]}  # fmt: skip
    scores = rng.random((n_images, per_image)).astype(np.float32)
    valid = np.ones((n_images, per_image), bool)
    ids = np.arange(1, n_images + 1)
    return gt, (boxes, scores, classes, valid, ids, cats)


def before(gt, dets):
    return coco_evaluate(gt, to_coco_results(*dets), backend="pycocotools")


def after(gt, dets):
    return coco_evaluate(gt, coco_results_array(*dets), backend="faster_coco_eval")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--detections", type=int, default=100, help="per image")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    gt, dets = make_data(args.images, args.detections)
    times = {"before": [], "after": []}
    metrics = {}
    for _ in range(args.rounds):
        for name, fn in (("before", before), ("after", after)):
            t = time.perf_counter()
            metrics[name] = fn(gt, dets)
            times[name].append(time.perf_counter() - t)
    same = all(abs(metrics["before"][k] - metrics["after"][k]) < 1e-9 for k in metrics["before"])
    b, a = min(times["before"]), min(times["after"])
    print(f"CPU: {cpu_model()}; {args.images} images x {args.detections} detections, "
          f"best of {args.rounds}")
    print("| | results | backend | seconds |")
    print("|---|---|---|---|")
    print(f"| before | dicts (to_coco_results) | pycocotools | {b:.1f} |")
    print(f"| after | [N, 7] array (coco_results_array) | faster-coco-eval | {a:.1f} |")
    print(f"after / before: {a / b:.2f}x; AP {metrics['after']['AP']:.4f}; "
          f"all metrics equal: {same}")


if __name__ == "__main__":
    main()
