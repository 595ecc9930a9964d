"""`voc_folder`: a TFDS builder for any PASCAL VOC-format folder (what labelImg and CVAT's
"PASCAL VOC 1.1" export write, and VOCdevkit/VOC20xx itself).

    builder = build_voc_folder(data_dir, root="VOCdevkit/VOC2007")   # classes from the XMLs
    builder = build_voc_folder(data_dir, root=..., class_names=VOC_CLASSES)

The folder holds `Annotations/<id>.xml`, `JPEGImages/<id>.jpg` and
`ImageSets/Main/<split>.txt` (one image id per line); every `<split>.txt` whose name has
no underscore becomes a TFDS split of that name ("train", "val", "trainval", "test";
the per-class lists such as `dog_train.txt` are ignored).

Features: TFDS `voc/2007`'s objects (bbox, label, is_difficult, is_truncated) plus
`image/id` (`records.image_id_from_name` of the file name, as for TFDS voc records) and
`image/filename`. Boxes are the XML's pixel coordinates divided by the image size, as
TFDS's voc builder stores them (no -1 shift), so a model trained here predicts the XML's
coordinates, and the VOC metric compares like with like.

Validation at build time: image ids must stay inside the folder (no `..`, no absolute
path) and name an existing XML and image, else an error naming the split file and id.
A class name not in `class_names` is an error naming the XML and the name (with
`class_names` empty the list is inferred: every name in the folder's XMLs, sorted). An
XML that does not parse, or an image whose header does not read, is skipped; a box with
`xmax <= xmin` or `ymax <= ymin` (or non-numeric) is dropped, a box outside the image
clipped. All of these are counted in `info.metadata["build_stats"]`, with the first
skipped files named in `skipped_files`, and logged.

The build's name hashes the folder and class list, then the split files' content and the
size and modification time of every XML and image, so editing the annotations builds
afresh (and the log says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from m2det_jax.data import records, schema
from m2det_jax.data.sources.coco_folder import resolve_image_path
from m2det_jax.paths import as_path, as_str

log = logging.getLogger(__name__)

# PASCAL VOC's 20 classes in the order of the original code and TFDS (model labels 1..20).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_MAX_NAMED = 20  # skipped files named in build_stats


def voc_features(names) -> tfds.features.FeaturesDict:
    """TFDS voc/2007's object features plus image/id."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=list(names)),
            "is_difficult": np.bool_,
            "is_truncated": np.bool_,
        }),
    })  # fmt: skip


@dataclasses.dataclass
class VocFolderConfig(tfds.core.BuilderConfig):
    """The folder and class list; build through `voc_folder_config`."""

    root: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()


def split_files(root: str) -> dict[str, object]:
    """{split name: path} of `ImageSets/Main/<split>.txt` without an underscore."""
    main = as_path(root) / "ImageSets" / "Main"
    if not main.is_dir():
        raise FileNotFoundError(f"VOC folder {root!r}: no ImageSets/Main/ folder")
    out = {p.name[:-4]: p for p in sorted(main.iterdir())
           if p.name.endswith(".txt") and "_" not in p.name[:-4]}  # fmt: skip
    if not out:
        raise FileNotFoundError(f"VOC folder {root!r}: no ImageSets/Main/<split>.txt")
    return out


def _ids(path) -> list[str]:
    return [line.split()[0] for line in as_path(path).read_text().splitlines() if line.strip()]


def _file(root: str, sub: str, image_id: str, ext: str, where: str) -> str:
    """Path of `<root>/<sub>/<image_id><ext>`, refused if the id escapes the folder."""
    return resolve_image_path(os.fspath(as_path(root) / sub), image_id + ext, where)


def _parse(xml_path: str) -> tuple[dict, list[dict]]:
    """(size {"width", "height"} or {}, objects with name, box strings, flags) of an XML."""
    root = ET.fromstring(as_path(xml_path).read_bytes())
    size = {}
    s = root.find("size")
    if s is not None:
        for key in ("width", "height"):
            try:
                size[key] = float(s.findtext(key, ""))
            except ValueError:
                pass
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        objects.append({
            "name": (obj.findtext("name") or "").strip(),
            "box": [box.findtext(k) if box is not None else None
                    for k in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": (obj.findtext("difficult") or "0").strip() == "1",
            "truncated": (obj.findtext("truncated") or "0").strip() == "1",
        })  # fmt: skip
    return size, objects


def infer_class_names(root: str) -> tuple[str, ...]:
    """Every object name in the XMLs the split files list, sorted (unparseable skipped)."""
    names = set()
    for split, path in split_files(root).items():
        for i in _ids(path):
            try:
                _, objects = _parse(_file(root, "Annotations", i, ".xml", f"{split}.txt"))
            except (ET.ParseError, OSError):
                continue
            names.update(o["name"] for o in objects if o["name"])
    if not names:
        raise ValueError(f"VOC folder {root!r}: no object names found in its XMLs")
    return tuple(sorted(names))


def voc_folder_config(root: str | os.PathLike, class_names=()) -> VocFolderConfig:
    """Config named after the folder and classes, and its inputs (the split files'
    content, the Annotations/ and JPEGImages/ listings): `v<folder>_<inputs>`."""
    root = as_str(root)
    splits = split_files(root)
    names = tuple(class_names) or infer_class_names(root)
    if len(set(names)) != len(names):
        raise ValueError(f"data.class_names={names}: names must be unique")
    digest = hashlib.sha1("\n".join([root, *names]).encode()).hexdigest()[:8]
    folders = [os.fspath(as_path(root) / sub) for sub in ("Annotations", "JPEGImages")]
    inputs = schema.inputs_digest(list(splits.values()), folders)
    return VocFolderConfig(
        name=f"v{digest}_{inputs[:8]}",
        description=f"VOC-format folder: {root}",
        root=root,
        class_names=names,
        splits=tuple(splits),
    )


class VocFolder(tfds.core.GeneratorBasedBuilder):
    """Any VOC-format folder as a TFDS dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = []  # always built with an explicit `voc_folder_config(...)`

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=c.description,
            features=voc_features(c.class_names),
            metadata=tfds.core.MetadataDict(
                category_ids=list(range(1, len(c.class_names) + 1)),
                build_stats={"bad_xml": 0, "bad_images": 0, "bad_boxes": 0, "clipped_boxes": 0,
                             "skipped_files": []},  # fmt: skip
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        known = {n: i for i, n in enumerate(c.class_names)}
        out = {}
        for split, path in split_files(c.root).items():
            where = os.fspath(path)
            items = []
            for i in _ids(path):  # validate every id before writing anything
                xml = _file(c.root, "Annotations", i, ".xml", where)
                jpg = _file(c.root, "JPEGImages", i, ".jpg", where)
                for f in (xml, jpg):
                    if not as_path(f).is_file():
                        raise FileNotFoundError(f"{where}: image id {i!r}: no file {f!r}")
                items.append((i, xml, jpg))
            out[split] = self._generate_examples(items, known)
        return out

    def _skip(self, stats: dict, key: str, path: str, why: str) -> None:
        stats[key] += 1
        if len(stats["skipped_files"]) < _MAX_NAMED:
            stats["skipped_files"].append(f"{path}: {why}")
        log.warning("voc_folder: skipped %s (%s)", path, why)

    def _generate_examples(self, items, known: dict[str, int]):
        stats = self.info.metadata["build_stats"]
        for image_id, xml, jpg in items:
            try:
                size, objects = _parse(xml)
            except ET.ParseError as e:
                self._skip(stats, "bad_xml", xml, f"XML does not parse: {e}")
                continue
            raw = as_path(jpg).read_bytes()
            try:
                with Image.open(io.BytesIO(raw)) as pil:
                    w, h = map(float, pil.size)
            except Exception as e:  # noqa: BLE001 - any decoder failure: corrupt image
                self._skip(stats, "bad_images", jpg, f"image does not read: {e}")
                continue
            w, h = size.get("width") or w, size.get("height") or h  # the XML's size rules
            out = []
            for o in objects:
                if o["name"] not in known:
                    raise ValueError(
                        f"{xml}: class {o['name']!r} is not in data.class_names "
                        f"{list(known)} (leave data.class_names empty to infer the list)")
                box = _box(o["box"], w, h, stats)
                if box is not None:
                    out.append({"bbox": box, "label": known[o["name"]],
                                "is_difficult": o["difficult"],
                                "is_truncated": o["truncated"]})  # fmt: skip
            name = image_id + ".jpg"
            yield image_id, {
                "image": raw,
                "image/filename": name,
                "image/id": records.image_id_from_name(name),
                "objects": out,
            }


def _box(xyxy, w: float, h: float, stats: dict) -> tfds.features.BBox | None:
    """XML pixel corners -> TFDS BBox (clipped, counted); None (counted) if unusable."""
    try:
        x1, y1, x2, y2 = (float(v) for v in xyxy)
    except (TypeError, ValueError):
        x1 = y1 = x2 = y2 = math.nan
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        stats["bad_boxes"] += 1
        return None
    box = (y1 / h, x1 / w, y2 / h, x2 / w)
    clipped = tuple(min(max(v, 0.0), 1.0) for v in box)
    if clipped != box:
        stats["clipped_boxes"] += 1
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        stats["bad_boxes"] += 1
        return None
    return tfds.features.BBox(*clipped)


def build_voc_folder(data_dir: str | os.PathLike, *, root: str | os.PathLike,
                     class_names=()) -> VocFolder:  # fmt: skip
    """Builds (if needed) the folder's TFDS dataset into `data_dir`; returns the builder."""
    if not root:
        raise ValueError("voc_folder needs cfg.data.root (the folder with Annotations/)")
    builder = VocFolder(data_dir=os.fspath(data_dir), config=voc_folder_config(root, class_names),
                        file_format="array_record")  # fmt: skip
    schema.prepare(builder, stale_prefix=builder.builder_config.name.split("_")[0] + "_")
    stats = builder.info.metadata.get("build_stats", {})
    if any(v for k, v in stats.items() if k != "skipped_files"):
        log.warning("voc_folder %s: %s", root, stats)
    return builder
