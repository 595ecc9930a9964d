"""`shapes`: a synthetic detection dataset generated locally (TFDS builder, no download).

Images are RGB (default 128x128) with 1-6 filled shapes of `CLASS_NAMES` on textured,
noisy backgrounds; shapes vary in size, colour and position and may overlap (later
shapes are drawn over earlier ones; a shape is only placed if its box overlaps every
earlier box by IoU <= 0.3, so each keeps a visible part). Every example is a pure
function of (seed, split, index), so builds are deterministic and order-independent.

Features follow `coco/2017` (image, image/filename, image/id, objects{bbox, label,
area, is_crowd, id}), stored as array_record so they are read without TensorFlow.

    builder = build_shapes("/tmp/tfds")             # 2000 train / 200 validation
    builder = build_shapes(d, num_train=16, num_validation=8)   # tests
    coco_json.annotation_file(builder, "validation")            # for pycocotools
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from m2det_jax.core import box_ops
from m2det_jax.data import coco_json, schema

CLASS_NAMES = ("circle", "square", "triangle", "cross")
_SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Size of the generated set. Build through `shapes_config` so the name is unique."""

    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0
    max_objects: int = 6


def shapes_config(
    image_size: int = 128,
    num_train: int = 2000,
    num_validation: int = 200,
    seed: int = 0,
    max_objects: int = 6,
) -> ShapesConfig:
    """A `ShapesConfig` whose name encodes its parameters (its own folder in data_dir)."""
    name = f"s{image_size}_tr{num_train}_va{num_validation}_seed{seed}_max{max_objects}"
    return ShapesConfig(
        name=name,
        description="synthetic shapes",
        image_size=image_size,
        num_train=num_train,
        num_validation=num_validation,
        seed=seed,
        max_objects=max_objects,
    )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background: colour gradient + random stripes/checker + pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]  # [S, S, 3]
    kind = rng.integers(0, 3)
    if kind == 1:  # stripes
        freq = rng.uniform(4, 16)
        img += 25 * np.sin(2 * np.pi * freq * (xx if rng.random() < 0.5 else yy))[..., None]
    elif kind == 2:  # checker
        n = int(rng.integers(4, 12))
        img += 20 * (((xx * n).astype(int) + (yy * n).astype(int)) % 2 * 2 - 1)[..., None]
    img += rng.normal(0, rng.uniform(3, 15), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-9)


def make_example(seed: int, split: str, index: int, size: int = 128, max_objects: int = 6):
    """One example: (uint8 image [S,S,3], boxes [N,4] pixel xyxy float, labels [N] int).

    Box edges are the shape's exact pixel extent (x2/y2 exclusive).
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 2), index])
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, max_objects + 1))
    boxes, labels = [], []
    for _ in range(n * 10):  # placement attempts
        if len(boxes) == n:
            break
        w = rng.uniform(0.12, 0.5) * size
        h = w * rng.uniform(0.7, 1.4) if rng.random() < 0.5 else w
        h = min(h, 0.6 * size)
        x0 = rng.uniform(0, size - w)
        y0 = rng.uniform(0, size - h)
        x0, y0 = int(x0), int(y0)
        x1, y1 = int(x0 + w), int(y0 + h)  # inclusive pixel corner for PIL
        box = np.array([x0, y0, x1 + 1, y1 + 1], np.float64)
        if any(_iou(box, b) > 0.3 for b in boxes):
            continue
        label = int(rng.integers(0, len(CLASS_NAMES)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        name = CLASS_NAMES[label]
        if name == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif name == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif name == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        else:  # cross: two bars of a third of the width/height
            tw, th = max((x1 - x0) // 3, 1), max((y1 - y0) // 3, 1)
            cx0 = x0 + (x1 - x0 - tw) // 2
            cy0 = y0 + (y1 - y0 - th) // 2
            draw.rectangle([cx0, y0, cx0 + tw, y1], fill=colour)
            draw.rectangle([x0, cy0, x1, cy0 + th], fill=colour)
        boxes.append(box)
        labels.append(label)
    return np.asarray(img), np.array(boxes, np.float64).reshape(-1, 4), np.array(labels)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (PIL; tfds would need TensorFlow to encode arrays)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes detection dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [shapes_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic shapes for object detection (m2det_jax).",
            features=schema.coco_features(CLASS_NAMES, "png"),
            metadata=tfds.core.MetadataDict(category_ids=list(range(1, len(CLASS_NAMES) + 1))),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
        }

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        for i in range(num):
            img, boxes, labels = make_example(c.seed, split, i, c.image_size, c.max_objects)
            yxyx = box_ops.xyxy_to_yxyx(boxes / float(c.image_size))  # TFDS BBox order
            xywh = box_ops.xyxy_to_xywh(boxes)
            image_id = _SPLIT_IDS[split] * 1_000_000 + i + 1
            objects = [
                {
                    "area": int(xywh[k, 2] * xywh[k, 3]),
                    "bbox": tfds.features.BBox(*(float(v) for v in yxyx[k])),
                    "id": image_id * 100 + k,
                    "is_crowd": False,
                    "label": int(lab),
                }
                for k, lab in enumerate(labels)
            ]
            yield (
                image_id,
                {
                    "image": encode_png(img),
                    "image/filename": f"{split}_{i:06d}.png",
                    "image/id": image_id,
                    "objects": objects,
                },
            )


def build_shapes(
    data_dir: str | os.PathLike,
    *,
    image_size: int = 128,
    num_train: int = 2000,
    num_validation: int = 200,
    seed: int = 0,
    max_objects: int = 6,
) -> Shapes:
    """Generates (if needed) the shapes set into `data_dir`; returns its prepared builder.

    Also writes `instances_<split>.json` (COCO format) next to the data; see
    `coco_json.annotation_file`.
    """
    config = shapes_config(image_size, num_train, num_validation, seed, max_objects)
    if config.name in {c.name for c in Shapes.BUILDER_CONFIGS}:
        config = config.name  # TFDS refuses a new object named like a shipped config
    builder = Shapes(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    schema.prepare(builder)
    for split in ("train", "validation"):
        coco_json.annotation_file(builder, split)
    return builder
