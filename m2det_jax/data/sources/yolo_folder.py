"""YOLO-format folders (`data.dataset=yolo_folder`, `data.yolo_yaml=PATH`).

The layout ultralytics users hold their data in: a dataset YAML

    path: /data/mine          # the root (default: the YAML's folder)
    train: images/train       # a folder of images, a .txt list of image paths, or a list
    val: images/val
    names: [cat, dog]         # or {0: cat, 1: dog}

and, for each image `.../images/<sub>/x.jpg`, a label file `.../labels/<sub>/x.txt` with one
line `class cx cy w h` per object (class from 0, the rest normalised to [0, 1]); an image
without a label file has no objects. The folder is converted to COCO-format JSON (class k
becomes category k + 1; boxes to pixels with the image size read from its header), written
under `<data_dir>/yolo_folder/<folder hash>/` only when its content changed, and built
with the `coco_folder` builder: the same skipping and counting of bad images, the
rebuild when labels are edited, COCO metrics. Label lines that do not parse, name an
unknown class or have a non-positive size are skipped and counted, with the files named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import yaml

from m2det_jax.data import records
from m2det_jax.data.sources.coco_folder import build_coco_folder
from m2det_jax.paths import as_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = (("train", "train"), ("val", "validation"))


def _names(spec, where: str) -> list[str]:
    if isinstance(spec, dict):
        keys = sorted(int(k) for k in spec)
        if keys != list(range(len(keys))):
            raise ValueError(f"{where}: names must be numbered 0..N-1, got {keys}")
        return [str(spec[k]) for k in keys]
    if isinstance(spec, (list, tuple)) and spec:
        return [str(n) for n in spec]
    raise ValueError(f"{where}: 'names' (a list or {{id: name}}) is required")


def _images_of(entry, root: str, where: str) -> list[str]:
    """Absolute image paths of a split entry: folder(s) or .txt list file(s)."""
    out: list[str] = []
    for e in entry if isinstance(entry, (list, tuple)) else [entry]:
        p = os.path.normpath(os.path.join(root, str(e)))
        if os.path.isdir(p):
            for dirpath, _, files in sorted(os.walk(p)):
                out += [os.path.join(dirpath, f) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
        elif os.path.isfile(p) and p.endswith(".txt"):
            with open(p) as f:
                out += [os.path.normpath(os.path.join(root, line.strip()))
                        for line in f if line.strip()]  # fmt: skip
        else:
            raise FileNotFoundError(f"{where}: split entry {e!r}: no folder or .txt list "
                                    f"at {p}")  # fmt: skip
    return out


def label_file(image_path: str) -> str:
    """The label file of an image: the last `images` folder of its path -> `labels`."""
    head, name = os.path.split(image_path)
    parts = head.split(os.sep)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
    return os.path.join(os.sep.join(parts), os.path.splitext(name)[0] + ".txt")


def _coco_of(images: list[str], root: str, names: list[str], stats: dict[str, int],
             bad_files: list[str]) -> dict:  # fmt: skip
    out_images, anns = [], []
    for image_id, path in enumerate(images, start=1):
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            raise ValueError(f"image {path} is outside the dataset root {root}")
        try:
            with open(path, "rb") as f:
                hw = records.image_hw(f.read())
        except OSError:
            hw = None
        if hw is None:  # the coco_folder build skips and counts it (bad_images)
            hw = (1, 1)
        h, w = hw
        out_images.append({"id": image_id, "file_name": rel, "height": h, "width": w})
        lf = label_file(path)
        if not os.path.isfile(lf):
            stats["images_without_labels"] += 1
            continue
        with open(lf) as f:
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                try:
                    k, cx, cy, bw, bh = int(fields[0]), *map(float, fields[1:5])
                    ok = len(fields) == 5 and 0 <= k < len(names) and bw > 0 and bh > 0
                except (ValueError, IndexError):
                    ok = False
                if not ok:
                    stats["bad_label_lines"] += 1
                    bad_files.append(lf)
                    continue
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k + 1,
                             "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h],
                             "area": bw * w * bh * h, "iscrowd": 0})  # fmt: skip
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return {"images": out_images, "annotations": anns, "categories": cats}


def _write_if_changed(path, text: str) -> None:
    p = as_path(path)
    if not p.exists() or p.read_text() != text:
        p.write_text(text)


def build_yolo_folder(data_dir: str | os.PathLike, yaml_path: str | os.PathLike):
    """Converts the YOLO dataset of `yaml_path` (when it changed) and builds it with the
    coco_folder builder in `data_dir`; returns the builder."""
    if not yaml_path:
        raise ValueError("yolo_folder needs cfg.data.yolo_yaml (the dataset YAML)")
    yaml_path = os.path.abspath(os.fspath(yaml_path))
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"data.yolo_yaml: no file {yaml_path}")
    with open(yaml_path) as f:
        spec = yaml.safe_load(f) or {}
    root = os.path.normpath(os.path.join(os.path.dirname(yaml_path), str(spec.get("path", "."))))
    names = _names(spec.get("names"), yaml_path)
    if "train" not in spec:
        raise ValueError(f"{yaml_path}: 'train' (images folder or list) is required")
    out = as_path(data_dir) / "yolo_folder" / hashlib.sha1(yaml_path.encode()).hexdigest()[:8]
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, split in SPLITS:
        if key not in spec:
            continue
        stats = {"bad_label_lines": 0, "images_without_labels": 0}
        bad: list[str] = []
        coco = _coco_of(_images_of(spec[key], root, yaml_path), root, names, stats, bad)
        if stats["bad_label_lines"] or stats["images_without_labels"]:
            log.warning("yolo_folder %s %s: %s%s", yaml_path, split, stats,
                        f"; bad lines in {sorted(set(bad))[:5]}" if bad else "")  # fmt: skip
        files[split] = out / f"{split}.json"
        _write_if_changed(files[split], json.dumps(coco))
    return build_coco_folder(data_dir, image_dir=root, annotation_file=files["train"],
                             eval_image_dir=root if "validation" in files else None,
                             eval_annotation_file=files.get("validation"))  # fmt: skip
