"""Evaluation pictures (`m2det eval --plots`, and training's final evaluation): PR curves,
a confusion matrix, a per-class table and the worst-scoring images, written to a folder.

Everything comes from COCO evaluation's own matching, no matcher of ours:
* PR curves and the per-class table read the accumulated arrays of the evaluation that
  gave the metrics (`coco_evaluate(..., keep=)`: precision [T, R, K, A, M] over COCO's 101
  recall points, recall [T, K, A, M]); the mean curve's area is the AP it reports.
* The confusion matrix and the per-image scores come from one more pycocotools COCOeval
  run with `useCats=0` (class-agnostic matching at IoU 0.5: each detection, by descending
  score, takes the best unmatched ground truth), whose per-image matches are then compared
  by class: true class x predicted class, plus a background row (detections matching
  nothing) and column (ground truth no detection matched), counting detections with
  score >= `score_threshold`.

`sample_detections` draws a few images' detections (TensorBoard images at each of
training's evaluations).

Files: `pr_curves.png` (IoU 0.5 and 0.5:0.95; every class thin, the mean thick),
`confusion_matrix.png` (counts and rows normalised), `per_class.md` and `per_class.csv`
(AP, AP50, AP75, AR100, ground-truth count), `worst_images.png` (the images whose ground
truth was found least: ground truth left, predictions right).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2det_jax.inference.detector import make_detector
from m2det_jax.inference.image_files import detections_to_records, draw_detections
from m2det_jax.paths import as_path


def save_png(fig: Figure, path, dpi: int = 100) -> str:
    """Writes `fig` as a PNG (Agg canvas: no display, no global pyplot state)."""
    FigureCanvasAgg(fig)
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return os.fspath(path)


def pr_figure(keep: dict, names: Sequence[str]) -> Figure:
    """PR curves: left IoU 0.5, right the mean over IoU 0.5:0.95 (classes thin, their
    mean thick, labelled with its area = AP50 / AP)."""
    p, rec = keep["precision"][:, :, :, 0, -1], keep["recall_thresholds"]  # [T, R, K]
    fig = Figure(figsize=(11, 4.6))
    for ax, curves, title in ((fig.add_subplot(1, 2, 1), p[0], "IoU 0.5"),
                              (fig.add_subplot(1, 2, 2), p.mean(0), "IoU 0.5:0.95")):
        valid = (p > -1).all(axis=(0, 1))  # classes with ground truth
        for k in np.flatnonzero(valid):
            ax.plot(rec, curves[:, k], lw=0.8, alpha=0.6,
                    label=f"{names[k]} {curves[:, k].mean():.3f}")  # fmt: skip
        mean = curves[:, valid].mean(axis=1) if valid.any() else np.zeros_like(rec)
        ax.plot(rec, mean, lw=2.5, color="k", label=f"all classes {mean.mean():.3f}", gid="mean")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=title)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def per_class_rows(keep: dict, names: Sequence[str], gt_counts: dict[int, int]) -> list[dict]:
    """[{class, AP, AP50, AP75, AR100, ground_truth}] from the accumulated arrays (-1 for a
    class without ground truth)."""
    p, r = keep["precision"][:, :, :, 0, -1], keep["recall"][:, :, 0, -1]

    def mean(x):
        x = x[x > -1]
        return float(x.mean()) if x.size else -1.0

    thr = list(np.round(keep["iou_thresholds"], 2))
    return [{"class": names[k], "AP": mean(p[:, :, k]), "AP50": mean(p[thr.index(0.5), :, k]),
             "AP75": mean(p[thr.index(0.75), :, k]), "AR100": mean(r[:, k]),
             "ground_truth": int(gt_counts.get(cat, 0))}
            for k, cat in enumerate(keep["category_ids"])]  # fmt: skip


def agnostic_matches(dataset: dict, results: np.ndarray, image_ids) -> list[dict]:
    """pycocotools' per-image evaluation with useCats=0 at IoU 0.5 (area "all", up to 100
    detections per image): [{"image_id", "dt": [(category, score, matched gt or 0)], "gt":
    [(category, matched by a detection id or 0, ignored)]}]."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(np.asarray(results, np.float64)) if len(results) else None
        if dt is None:
            return []
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.params.useCats = 0
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
    out = []
    n = len(ev.params.imgIds)
    for e in ev.evalImgs[:n]:  # area "all" comes first
        if e is None:
            continue
        dts = [(dt.anns[d]["category_id"], float(s), int(m))
               for d, s, m in zip(e["dtIds"], e["dtScores"], e["dtMatches"][0], strict=True)]
        gts = [(gt.anns[g]["category_id"], int(m), bool(i))
               for g, m, i in zip(e["gtIds"], e["gtMatches"][0], e["gtIgnore"], strict=True)]
        out.append({"image_id": e["image_id"], "dt": dts, "gt": gts,
                    "dt_ids": list(e["dtIds"])})  # fmt: skip
    return out


def confusion_matrix(matches: list[dict], cat_ids: Sequence[int], score_threshold: float,
                     gt_anns: dict[int, dict]) -> np.ndarray:  # fmt: skip
    """[K+1, K+1] counts: rows the true class (last: background, i.e. a detection that
    matched nothing), columns the predicted class (last: background, i.e. ground truth no
    detection matched)."""
    k = len(cat_ids)
    index = {c: i for i, c in enumerate(cat_ids)}
    m = np.zeros((k + 1, k + 1), np.int64)
    for img in matches:
        kept = {d: (c, s) for d, (c, s, _) in zip(img["dt_ids"], img["dt"], strict=True)
                if s >= score_threshold}  # fmt: skip
        for (c, s, g) in img["dt"]:
            if s < score_threshold:
                continue
            if g:
                m[index[gt_anns[g]["category_id"]], index[c]] += 1
            else:
                m[k, index[c]] += 1
        for (c, by, ignored) in img["gt"]:
            if not ignored and by not in kept:
                m[index[c], k] += 1
    return m


def confusion_figure(m: np.ndarray, names: Sequence[str]) -> Figure:
    labels = list(names) + ["background"]
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(6 + 0.5 * len(labels), 3 + 0.25 * len(labels)))
    for i, (a, title, fmt) in enumerate(((m, "counts", "d"), (norm, "rows normalised", ".2f"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(a, cmap="Blues")
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), title=title,
               xlabel="predicted", ylabel="true")  # fmt: skip
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        if len(labels) <= 25:
            top = a.max() or 1
            for (r, c), v in np.ndenumerate(a):
                ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=6,
                        color="white" if v > top / 2 else "black")  # fmt: skip
    fig.tight_layout()
    return fig


def image_scores(matches: list[dict], score_threshold: float, gt_anns) -> dict[int, float]:
    """Per image: detections (score >= threshold) that found a ground truth of their class,
    over max(ground truth, such detections); 1 = everything found, nothing extra."""
    out = {}
    for img in matches:
        dts = [(c, g) for c, s, g in img["dt"] if s >= score_threshold]
        right = sum(1 for c, g in dts if g and gt_anns[g]["category_id"] == c)
        n_gt = sum(1 for _, _, ignored in img["gt"] if not ignored)
        out[int(img["image_id"])] = right / max(n_gt, len(dts), 1)
    return out


def worst_figure(ids: Sequence[int], images: Callable[[int], np.ndarray | None],
                 dataset: dict, results: np.ndarray, names: dict[int, str],
                 score_threshold: float) -> Figure:  # fmt: skip
    """Ground truth (left) and predictions (right) of the images `ids`."""
    fig = Figure(figsize=(8, 3.2 * max(len(ids), 1)))
    for row, image_id in enumerate(ids):
        im = images(image_id)
        if im is None:
            continue
        gts = [{"box": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                        a["bbox"][1] + a["bbox"][3]], "class": a["category_id"],
                "label": names[a["category_id"]], "score": None}
               for a in dataset["annotations"] if a["image_id"] == image_id]  # fmt: skip
        dets = [{"box": [r[1], r[2], r[1] + r[3], r[2] + r[4]], "class": int(r[6]),
                 "label": names.get(int(r[6]), str(int(r[6]))), "score": float(r[5])}
                for r in results if int(r[0]) == image_id and r[5] >= score_threshold]
        for col, (recs, title) in enumerate(((gts, "ground truth"), (dets, "predicted"))):
            ax = fig.add_subplot(len(ids), 2, 2 * row + col + 1)
            ax.imshow(np.asarray(draw_detections(im, recs)))
            ax.set_title(f"image {image_id}: {title} ({len(recs)})", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


def sample_detections(cfg, variables, images: Sequence[np.ndarray], class_names,
                      score_threshold: float = 0.3) -> list[np.ndarray]:  # fmt: skip
    """`images` (uint8 RGB) with the detections of `variables` drawn (training's
    TensorBoard samples at each evaluation)."""
    detector = make_detector(cfg, variables, batch_size=len(images))
    dets = detector(list(images))
    return [np.asarray(draw_detections(im, detections_to_records(
        dets, i, im.shape[1], im.shape[0], score_threshold, class_names)))
            for i, im in enumerate(images)]  # fmt: skip


def write_pictures(out_dir, dataset: dict, results: np.ndarray, image_ids, keep: dict,
                   images: Callable[[int], np.ndarray | None], score_threshold: float = 0.25,
                   worst: int = 6) -> dict[str, str]:  # fmt: skip
    """Writes the files of the module docstring to `out_dir`; returns {what: path}.
    `dataset`: the COCO ground truth; `results`: [N, 7] COCO results rows; `keep`: what
    `coco_evaluate(..., keep=)` filled; `images(image_id)`: the RGB pixels of an image."""
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cat_names = {int(c["id"]): c["name"] for c in dataset["categories"]}
    names = [cat_names[c] for c in keep["category_ids"]]
    gt_anns = {int(a["id"]): a for a in dataset["annotations"]}
    counts: dict[int, int] = {}
    for a in dataset["annotations"]:
        if not a.get("iscrowd", 0):
            counts[int(a["category_id"])] = counts.get(int(a["category_id"]), 0) + 1
    written = {}

    def save(fig: Figure, name: str) -> None:
        written[name] = save_png(fig, out / name)

    save(pr_figure(keep, names), "pr_curves.png")
    rows = per_class_rows(keep, names, counts)
    cols = ["class", "AP", "AP50", "AP75", "AR100", "ground_truth"]
    with open(os.fspath(out / "per_class.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows)  # fmt: skip
    md = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    md += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                             for c in cols) + " |" for r in rows]  # fmt: skip
    (out / "per_class.md").write_text("\n".join(md) + "\n")
    written["per_class.csv"], written["per_class.md"] = (os.fspath(out / "per_class.csv"),
                                                         os.fspath(out / "per_class.md"))
    matches = agnostic_matches(dataset, results, image_ids)
    m = confusion_matrix(matches, keep["category_ids"], score_threshold, gt_anns)
    np.savetxt(os.fspath(out / "confusion_matrix.csv"), m, fmt="%d", delimiter=",",
               header=",".join(names + ["background"]))  # fmt: skip
    save(confusion_figure(m, names), "confusion_matrix.png")
    scores = image_scores(matches, score_threshold, gt_anns)
    for i in image_ids:  # images with no detection at all still rank
        scores.setdefault(int(i), 0.0 if any(a["image_id"] == int(i)
                                             for a in dataset["annotations"]) else 1.0)
    ids = sorted(scores, key=lambda i: (scores[i], i))[:worst]
    save(worst_figure(ids, images, dataset, results, cat_names, score_threshold),
         "worst_images.png")
    return written
