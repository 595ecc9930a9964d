"""`coco_folder`: a TFDS builder for any COCO-format folder (images + instances JSON).

    builder = build_coco_folder(data_dir, image_dir="imgs/train", annotation_file="train.json",
                                eval_image_dir="imgs/val", eval_annotation_file="val.json")

Splits: "train" from (image_dir, annotation_file) and, if given, "validation" from
(eval_image_dir, eval_annotation_file). Features are coco/2017's (image, image/filename,
image/id, objects{area, bbox, id, is_crowd, label}); labels are a contiguous index over
the sorted category ids of the (train) JSON, and `info.metadata["category_ids"]` maps them
back (`coco_json.category_ids`). Image ids and file names are kept; the image bytes are
stored as they are on disk (any format PIL reads).

Validation at build time (errors name the file): every `file_name` must be a relative
path that stays inside its image folder (no `..` escape, no absolute path, no symlink
out) and must exist. Bad content is *not* an error: a corrupt image is stored as is
and skipped (counted) when read; a box with NaN/inf or negative size is stored as an
empty box and dropped (counted) when read; a box reaching outside the image is clipped
here (TFDS boxes must lie in [0, 1]) and counted in `info.metadata["build_stats"]`.
Optional fields are normalised here, once, and counted: a missing `iscrowd` is 0, a
missing `area` the box's w x h; evaluation scores against these stored records
(`coco_json.ground_truth`), never the raw JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from m2det_jax.core import box_ops
from m2det_jax.data import schema
from m2det_jax.paths import as_path, as_str, is_uri, join

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CocoFolderConfig(tfds.core.BuilderConfig):
    """Paths of the splits; build through `coco_folder_config` (unique name per folder)."""

    image_dir: str = ""
    annotation_file: str = ""
    eval_image_dir: str = ""
    eval_annotation_file: str = ""


def coco_folder_config(
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    eval_image_dir: str | os.PathLike | None = None,
    eval_annotation_file: str | os.PathLike | None = None,
) -> CocoFolderConfig:
    """Config named after the folder (a hash of the absolute paths) and its inputs (the
    annotation files' content, the image folders' listing): `f<paths>_<inputs>`, so each
    folder gets its own build and an edited one is built afresh."""
    paths = [
        as_str(p) if p else ""
        for p in (image_dir, annotation_file, eval_image_dir, eval_annotation_file)
    ]
    digest = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:8]
    inputs = schema.inputs_digest([p for p in (paths[1], paths[3]) if p],
                                  sorted({p for p in (paths[0], paths[2]) if p}))  # fmt: skip
    return CocoFolderConfig(
        name=f"f{digest}_{inputs[:8]}",
        description="COCO-format folder: " + ", ".join(p for p in paths if p),
        image_dir=paths[0],
        annotation_file=paths[1],
        eval_image_dir=paths[2],
        eval_annotation_file=paths[3],
    )


def resolve_image_path(image_dir: str, file_name: str, annotation_file: str = "") -> str:
    """Absolute path of `file_name` inside `image_dir`; ValueError if it would escape."""
    where = f" (in {annotation_file})" if annotation_file else ""
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"image file_name {file_name!r}{where}: must be a non-empty string")
    if (
        os.path.isabs(file_name)
        or file_name.startswith(("/", "\\"))
        or (len(file_name) > 1 and file_name[1] == ":")
    ):
        raise ValueError(
            f"image file_name {file_name!r}{where}: absolute paths are refused; names must "
            f"be relative to the image folder {image_dir!r}"
        )
    parts = file_name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ValueError(
            f"image file_name {file_name!r}{where}: '..' is refused; names must stay "
            f"inside the image folder {image_dir!r}"
        )
    if is_uri(image_dir):  # object stores have no symlinks: the checks above suffice
        return os.fspath(join(image_dir, *parts))
    root = os.path.realpath(image_dir)
    path = os.path.realpath(os.path.join(root, file_name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(
            f"image file_name {file_name!r}{where}: resolves to {path!r}, outside the image "
            f"folder {image_dir!r} (symlink?)"
        )
    return path


def _load_json(path: str) -> dict:
    data = json.loads(as_path(path).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: not a COCO instances file (no {key!r})")
    return data


def _categories(path: str) -> tuple[list[int], list[str]]:
    cats = sorted(_load_json(path)["categories"], key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in cats]
    names, seen = [], set()
    for c in cats:
        name = str(c.get("name", c["id"])).replace("\n", " ")
        if name in seen:  # ClassLabel needs unique names
            name = f"{name}_{c['id']}"
        seen.add(name)
        names.append(name)
    return ids, names


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """Any COCO-format folder as a TFDS dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = []  # always built with an explicit `coco_folder_config(...)`

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        ids, names = _categories(c.annotation_file)
        return tfds.core.DatasetInfo(
            builder=self,
            description=c.description,
            features=schema.coco_features(names, "jpeg"),
            metadata=tfds.core.MetadataDict(
                category_ids=ids,
                build_stats={"clipped_boxes": 0, "invalid_boxes": 0, "unknown_category": 0,
                             "missing_area": 0, "missing_iscrowd": 0},  # fmt: skip
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        splits = {"train": (c.image_dir, c.annotation_file)}
        if c.eval_annotation_file:
            splits["validation"] = (c.eval_image_dir or c.image_dir, c.eval_annotation_file)
        ids, _ = _categories(c.annotation_file)
        out = {}
        for name, (image_dir, ann) in splits.items():
            data = _load_json(ann)
            if name != "train" and _categories(ann)[0] != ids:
                raise ValueError(f"{ann}: categories differ from {c.annotation_file}")
            # Validate every file name before writing anything.
            paths = {
                int(im["id"]): resolve_image_path(image_dir, im.get("file_name"), ann)
                for im in data["images"]
            }
            for p in paths.values():
                if not as_path(p).is_file():
                    raise FileNotFoundError(f"{ann}: image file {p!r} does not exist")
            out[name] = self._generate_examples(data, paths, {cid: i for i, cid in enumerate(ids)})
        return out

    def _generate_examples(self, data: dict, paths: dict[int, str], label_of: dict[int, int]):
        stats = self.info.metadata["build_stats"]
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        for im in data["images"]:
            image_id = int(im["id"])
            path = paths[image_id]
            raw = as_path(path).read_bytes()
            w, h = float(im.get("width") or 0), float(im.get("height") or 0)
            if w <= 0 or h <= 0:
                try:
                    with Image.open(io.BytesIO(raw)) as pil:
                        w, h = map(float, pil.size)
                except Exception:  # noqa: BLE001 - corrupt: skipped when read
                    w = h = 0.0
            objects = []
            for k, a in enumerate(by_image.get(image_id, [])):
                cid = int(a.get("category_id", -1))
                if cid not in label_of:
                    stats["unknown_category"] += 1
                    continue
                if "area" not in a:
                    stats["missing_area"] += 1
                if "iscrowd" not in a:
                    stats["missing_iscrowd"] += 1
                objects.append(
                    {
                        "area": _safe_int(a["area"] if "area" in a else _box_area(a.get("bbox"))),
                        "bbox": self._bbox(a.get("bbox"), w, h, stats),
                        "id": _safe_int(a.get("id", image_id * 1000 + k)),
                        "is_crowd": bool(a.get("iscrowd", 0)),
                        "label": label_of[cid],
                    }
                )
            yield (
                image_id,
                {
                    "image": raw,
                    "image/filename": str(im.get("file_name")),
                    "image/id": image_id,
                    "objects": objects,
                },
            )

    @staticmethod
    def _bbox(xywh, w: float, h: float, stats: dict) -> tfds.features.BBox:
        """COCO xywh pixels -> TFDS BBox; invalid -> empty box, out of range -> clipped."""
        try:
            x, y, bw, bh = (float(v) for v in xywh)
        except (TypeError, ValueError):
            x = y = bw = bh = math.nan
        vals = (x, y, bw, bh, w, h)
        if not all(math.isfinite(v) for v in vals) or bw < 0 or bh < 0 or w <= 0 or h <= 0:
            stats["invalid_boxes"] += 1
            return tfds.features.BBox(0.0, 0.0, 0.0, 0.0)
        box = box_ops.xywh_to_xyxy(np.array([x, y, bw, bh])) / np.array([w, h, w, h])
        clipped = np.clip(box, 0.0, 1.0)
        if (clipped != box).any():
            stats["clipped_boxes"] += 1
        return tfds.features.BBox(*(float(v) for v in box_ops.xyxy_to_yxyx(clipped)))


def _box_area(xywh) -> float:
    """w * h of a COCO box (0 if unreadable): the area of an annotation without one."""
    try:
        return float(xywh[2]) * float(xywh[3])
    except (TypeError, ValueError, IndexError):
        return 0.0


def _safe_int(v) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0
    return int(round(f)) if math.isfinite(f) else 0


def build_coco_folder(
    data_dir: str | os.PathLike,
    *,
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    eval_image_dir: str | os.PathLike | None = None,
    eval_annotation_file: str | os.PathLike | None = None,
) -> CocoFolder:
    """Builds (if needed) the folder's TFDS dataset into `data_dir`; returns the builder."""
    if not image_dir or not annotation_file:
        raise ValueError("coco_folder needs cfg.data.image_dir and cfg.data.annotation_file")
    builder = CocoFolder(
        data_dir=os.fspath(data_dir),
        config=coco_folder_config(image_dir, annotation_file, eval_image_dir, eval_annotation_file),
        file_format="array_record",
    )
    schema.prepare(builder, stale_prefix=builder.builder_config.name.split("_")[0] + "_")
    stats = builder.info.metadata.get("build_stats", {})
    if any(stats.values()):
        log.warning("coco_folder %s: %s", builder.builder_config.description, stats)
    return builder
