"""The COCO-like TFDS schema every builder shares, and how a prepared builder is read.

All datasets here carry the features of TFDS `coco/2017` (`coco_features`): image,
image/filename, image/id, objects{area, bbox (normalized [ymin, xmin, ymax, xmax]), id,
is_crowd, label (0..C-1)}. Builders are prepared with `prepare` (never the network) and
read with `data_source` (images left encoded; `records.decode_record` decodes them).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from m2det_jax.paths import as_path, is_uri

log = logging.getLogger(__name__)

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


def coco_features(names, encoding_format: str) -> tfds.features.FeaturesDict:
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
            "label": tfds.features.ClassLabel(names=list(names)),
        }),
    })  # fmt: skip


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The dataset's class names, index = TFDS label (model label - 1)."""
    return list(builder.info.features["objects"]["label"].names)


def inputs_digest(files=(), folders=()) -> str:
    """12 hex digits of the content of `files` (paths; missing ones hash as absent) and of
    the listing (name, size, modification time) of local `folders`: a build named with it
    is rebuilt when its inputs change. Object-store folders are not listed."""
    h = hashlib.sha1()
    for f in files:
        p = as_path(f)
        h.update(os.fspath(p).encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-"))
    for d in folders:
        if not d or is_uri(d) or not os.path.isdir(d):
            continue
        for root, dirs, names in os.walk(d):
            dirs.sort()
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), d)
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def prepare(builder: tfds.core.DatasetBuilder, stale_prefix: str = "") -> None:
    """`download_and_prepare` for generated builders; never touches the network.

    With `stale_prefix` (the part of a build's config name that names the folder, the rest
    hashing its inputs), a new build of a folder built before logs that its inputs changed.
    """
    if stale_prefix and not builder.is_prepared():
        root = as_path(builder.data_dir).parent.parent  # <data_dir>/<name>/<config>/<ver>
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
        this = builder.builder_config.name
        old = sorted(n for n in names if n.startswith(stale_prefix) and n != this)
        why = (f"its inputs changed since the build(s) {old}" if old else "first build")
        log.warning("building %s %s into %s: %s", builder.name,
                    builder.builder_config.description, builder.data_dir, why)  # fmt: skip
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """Random-access source over `split` (array_record); images stay encoded bytes.

    `split` may join splits with "+" ("train+validation"), read one after the other;
    "trainval", where the dataset has no such split, means train + validation (TFDS voc)
    or train + val (a VOC-format folder without trainval.txt). Images are decoded later,
    in `records.decode_record`, so a corrupt one is counted, not fatal.
    """
    splits = set(builder.info.splits)
    if split == "trainval" and split not in splits:  # VOC's name for train + val
        split = next((f"train+{v}" for v in ("validation", "val")
                      if {"train", v} <= splits), split)  # fmt: skip
    parts = [p.strip() for p in split.split("+")]
    if len(parts) > 1:
        return ConcatSource([data_source(builder, p) for p in parts])
    try:
        return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise FileNotFoundError(
            f"dataset {builder.name!r} split {split!r} is not readable from "
            f"{builder.data_dir!r} (splits there: {sorted(splits)}; {type(e).__name__}: {e}). "
            f"Prepare it first (array_record "
            f"format; TFDS Python API with download=False / a local data_dir)."
        ) from e


class ConcatSource:
    """Random access over several sources, one after the other (VOC 07+12 trainval)."""

    def __init__(self, sources):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        k = bisect.bisect_right(self._ends, index)
        return self.sources[k][index - (self._ends[k - 1] if k else 0)]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"
