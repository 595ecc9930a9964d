"""TFDS sources: open a prepared builder, read records without TensorFlow, COCO metadata.

One box format leaves this module: normalized `[x1, y1, x2, y2]` (TFDS's
`[ymin, xmin, ymax, xmax]` is converted here, once). Labels leave as 1..C-1 (0 is the
background); `category_ids(builder)[label - 1]` is the COCO category id.

Datasets by `cfg.data.dataset`:
  * "coco/2017" (or any TFDS detection set with coco/2017's features): must already be
    prepared (array_record) in `cfg.data.data_dir`; it is opened from its files
    (`prepared_builder`), so neither TensorFlow nor the network is needed.
  * "shapes": generated on first use (`shapes.build_shapes`).
  * "coco_folder": built on first use from `cfg.data.image_dir` + `cfg.data.annotation_file`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# COCO 2017's 80 categories as (id, name), in id order: TFDS coco/2017 label i is
# COCO_2017_CATEGORIES[i]. Data, not code: the ids have gaps (12, 26, 29, 30, ...).
COCO_2017_CATEGORIES = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)
COCO_2017_CATEGORY_IDS = tuple(i for i, _ in COCO_2017_CATEGORIES)

# Per-example counters (summed into `pipeline.DataStats`). See `decode_record`.
STAT_KEYS = (
    "examples",  # records read
    "bad_images",  # undecodable image: example skipped
    "bad_boxes",  # non-finite or degenerate (zero/negative size after clipping): dropped
    "clipped_boxes",  # boxes partly outside [0, 1]: clipped
    "crowd_boxes",  # is_crowd boxes dropped (cfg.data.include_crowd False)
    "empty_images",  # images left with no box (kept; train: only resized)
    "truncated_boxes",  # boxes beyond cfg.data.max_boxes: dropped
    "augment_fallbacks",  # augmentation left no box >= min size: un-augmented image used
)


def coco_features(class_names, encoding_format: str) -> tfds.features.FeaturesDict:
    """The feature spec of TFDS coco/2017, which our own builders share."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "area": np.int64,
            "bbox": tfds.features.BBoxFeature(),
            "id": np.int64,
            "is_crowd": np.bool_,
            "label": tfds.features.ClassLabel(names=list(class_names)),
        }),
    })  # fmt: skip


def new_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """`download_and_prepare` for generated builders; never touches the network."""
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def open_builder(cfg, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `cfg.data.dataset`, prepared (generated ones are built).

    Args:
      cfg: config; reads cfg.data.{dataset, data_dir, shapes_*, image_dir, annotation_file}.
      data_dir: overrides cfg.data.data_dir (None there means TFDS's default ~/tensorflow_datasets).
    """
    builder = _open_builder(cfg, data_dir)
    check_num_classes(cfg, builder)
    return builder


def _open_builder(cfg, data_dir) -> tfds.core.DatasetBuilder:
    d = cfg.data
    data_dir = os.fspath(data_dir) if data_dir is not None else d.get("data_dir")
    data_dir = os.path.expanduser(data_dir or "~/tensorflow_datasets")
    if d.dataset == "shapes":
        from m2det_jax.data.shapes import build_shapes

        return build_shapes(
            data_dir,
            image_size=d.shapes_image_size,
            num_train=d.shapes_num_train,
            num_validation=d.shapes_num_validation,
            seed=d.shapes_seed,
        )
    if d.dataset == "coco_folder":
        from m2det_jax.data.coco_folder import build_coco_folder

        return build_coco_folder(
            data_dir,
            image_dir=d.image_dir,
            annotation_file=d.annotation_file,
            eval_image_dir=d.eval_image_dir,
            eval_annotation_file=d.eval_annotation_file,
        )
    return prepared_builder(d.dataset, data_dir)


def prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """An already prepared TFDS dataset, opened from its files (no generation code).

    Reading from files needs neither the dataset's builder class (TFDS's `coco` class
    imports TensorFlow) nor the network.
    """
    from tensorflow_datasets.core import read_only_builder

    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared under data_dir={data_dir!r}; nothing is "
            f"downloaded here. Prepare it once with the TFDS Python API, e.g. "
            f"tfds.builder({name!r}, data_dir=..., file_format='array_record')"
            f".download_and_prepare(), and set cfg.data.data_dir."
        ) from e


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """Random-access source over `split` (array_record); images stay encoded bytes.

    Images are decoded later, in `decode_record`, so a corrupt one is counted, not fatal.
    """
    try:
        return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise FileNotFoundError(
            f"dataset {builder.name!r} split {split!r} is not readable from "
            f"{builder.data_dir!r} ({type(e).__name__}: {e}). Prepare it first (array_record "
            f"format; TFDS Python API with download=False / a local data_dir)."
        ) from e


def check_num_classes(cfg, builder: tfds.core.DatasetBuilder) -> None:
    """model.num_classes must hold the dataset's classes plus background 0."""
    n = builder.info.features["objects"]["label"].num_classes
    if cfg.model.num_classes < n + 1:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but dataset "
            f"{cfg.data.dataset!r} has {n} classes: set model.num_classes={n + 1} "
            "(classes + background)"
        )


def category_ids(builder: tfds.core.DatasetBuilder) -> list[int]:
    """COCO category id per contiguous TFDS label (model label - 1)."""
    meta = builder.info.metadata
    if meta is not None and "category_ids" in meta:
        return [int(i) for i in meta["category_ids"]]
    names = list(builder.info.features["objects"]["label"].names)
    by_name = {n: i for i, n in COCO_2017_CATEGORIES}
    norm = [n.replace("_", " ").lower() for n in names]
    if len(names) == 80 and all(n in by_name for n in norm):
        return [by_name[n] for n in norm]
    if len(names) == 80:
        return list(COCO_2017_CATEGORY_IDS)
    return list(range(1, len(names) + 1))


def decode_image(image: Any) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] from encoded bytes (or an array); None if undecodable."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    try:
        data = image.item() if isinstance(image, np.ndarray) else image
        with Image.open(io.BytesIO(bytes(data))) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - any decoder failure means "corrupt image"
        return None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        return None
    return arr


def clean_boxes(
    yxyx: np.ndarray, labels: np.ndarray, stats: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """TFDS [ymin,xmin,ymax,xmax] -> clipped normalized [x1,y1,x2,y2]; drops bad ones.

    Non-finite boxes, and boxes of zero or negative size after clipping to [0, 1], are
    dropped (`bad_boxes`); boxes reaching outside [0, 1] are clipped (`clipped_boxes`).
    """
    b = np.asarray(yxyx, np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]  # [N, 4] xyxy
    labels = np.asarray(labels).reshape(-1)
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    clipped = np.clip(b, 0.0, 1.0)
    stats["clipped_boxes"] += int((finite & (clipped != b).any(axis=1)).sum())
    ok = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    stats["bad_boxes"] += int((~ok).sum())
    return clipped[ok], labels[ok]


def decode_record(record: dict, include_crowd: bool = False) -> tuple[dict | None, dict]:
    """One TFDS record -> (example or None if unusable, per-example stats).

    The example: image uint8 RGB [H, W, 3], boxes float32 [N, 4] normalized xyxy,
    labels int32 [N] in 1..C-1, image_id int64, orig_size int32 [2] (height, width).
    """
    stats = new_stats()
    stats["examples"] = 1
    image = decode_image(record["image"])
    if image is None:
        stats["bad_images"] = 1
        return None, stats
    objects = record.get("objects", {})
    bbox = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    label = np.asarray(objects.get("label", np.zeros((0,))), np.int64).reshape(-1)
    n = min(len(bbox), len(label))
    bbox, label = bbox[:n], label[:n]
    if "is_crowd" in objects and n:
        crowd = np.asarray(objects["is_crowd"]).reshape(-1)[:n].astype(bool)
        if not include_crowd:
            stats["crowd_boxes"] += int(crowd.sum())
            bbox, label = bbox[~crowd], label[~crowd]
    boxes, label = clean_boxes(bbox, label, stats)
    example = {
        "image": image,
        "boxes": boxes,
        "labels": (label + 1).astype(np.int32),
        "image_id": np.int64(np.asarray(record.get("image/id", -1)).item()),
        "orig_size": np.array(image.shape[:2], np.int32),
    }
    return example, stats


def annotation_file(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """Path of a COCO-format `instances_<split>.json` for `split`; written once if absent.

    Built from the stored records themselves (so it matches what the pipeline reads):
    bbox in COCO xywh pixels, category ids from `category_ids(builder)`. Lives in
    `builder.data_dir`.
    """
    path = os.path.join(builder.data_dir, f"instances_{split}.json")
    if os.path.exists(path):
        return path
    source = data_source(builder, split)
    cat_ids = category_ids(builder)
    names = list(builder.info.features["objects"]["label"].names)
    images, annotations = [], []
    for i in range(len(source)):
        rec = source[i]
        raw = rec["image"]
        raw = raw.item() if isinstance(raw, np.ndarray) else raw
        try:
            with Image.open(io.BytesIO(bytes(raw))) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - corrupt images are not evaluated
            continue
        image_id = int(np.asarray(rec["image/id"]).item())
        fname = rec.get("image/filename", b"")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        obj = rec["objects"]
        bb = np.asarray(obj["bbox"], np.float64).reshape(-1, 4)
        for k in range(len(bb)):
            y0, x0, y1, x1 = bb[k]
            if not (x1 > x0 and y1 > y0):  # stored-empty (invalid) boxes: not ground truth
                continue
            ann_id = int(np.asarray(obj["id"]).reshape(-1)[k]) if "id" in obj else 0
            annotations.append(
                {
                    "id": ann_id or len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[int(np.asarray(obj["label"]).reshape(-1)[k])],
                    "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h],
                    "area": float(np.asarray(obj["area"]).reshape(-1)[k])
                    if "area" in obj
                    else (x1 - x0) * w * (y1 - y0) * h,
                    "iscrowd": int(bool(np.asarray(obj["is_crowd"]).reshape(-1)[k]))
                    if "is_crowd" in obj
                    else 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names, strict=True)],
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, path)
    return path
