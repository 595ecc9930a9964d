"""Dataset name -> prepared TFDS builder: the one place `cfg.data.dataset` is looked up.

Datasets by `cfg.data.dataset` (`GENERATED` maps the names we build ourselves):
  * "shapes": generated on first use (`data.sources.shapes.build_shapes`).
  * "coco_folder": built on first use from `cfg.data.image_dir` + `cfg.data.annotation_file`
    (`data.sources.coco_folder.build_coco_folder`).
  * "voc_folder": built on first use from the VOC-format folder `cfg.data.root`
    (`data.sources.voc_folder.build_voc_folder`; classes `cfg.data.class_names`, or inferred).
  * "yolo_folder": a YOLO-format folder (dataset YAML `cfg.data.yolo_yaml`, images/ +
    labels/), converted to COCO-format JSON and built as a coco_folder
    (`data.sources.yolo_folder.build_yolo_folder`).
  * "voc": PASCAL VOC07+12 (`ALIASES`): TFDS voc/2007, whose "trainval" is followed by
    voc/2012's "trainval" for training; evaluation reads voc/2007 (its "test").
  * any other name, e.g. "coco/2017", "voc/2007", "voc/2012" (or any TFDS detection set
    with their features): must already be prepared (array_record) in `cfg.data.data_dir`; it is
    opened from its files (`prepared_builder`), so neither TensorFlow nor the network
    is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from m2det_jax.data import coco_json, schema
from m2det_jax.data.sources.coco_folder import build_coco_folder
from m2det_jax.data.sources.shapes import build_shapes
from m2det_jax.data.sources.voc_folder import VOC_CLASSES, build_voc_folder
from m2det_jax.data.sources.yolo_folder import build_yolo_folder
from m2det_jax.paths import as_str


def _shapes(d, data_dir: str) -> tfds.core.DatasetBuilder:
    return build_shapes(
        data_dir,
        image_size=d.shapes_image_size,
        num_train=d.shapes_num_train,
        num_validation=d.shapes_num_validation,
        seed=d.shapes_seed,
    )


def _voc_folder(d, data_dir: str) -> tfds.core.DatasetBuilder:
    return build_voc_folder(data_dir, root=d.root, class_names=tuple(d.class_names))


def _coco_folder(d, data_dir: str) -> tfds.core.DatasetBuilder:
    return build_coco_folder(
        data_dir,
        image_dir=d.image_dir,
        annotation_file=d.annotation_file,
        eval_image_dir=d.eval_image_dir,
        eval_annotation_file=d.eval_annotation_file,
    )


def _yolo_folder(d, data_dir: str) -> tfds.core.DatasetBuilder:
    return build_yolo_folder(data_dir, d.yolo_yaml)


# Datasets generated here on first use: name -> f(cfg.data, data_dir) -> prepared builder.
GENERATED: dict[str, Callable[..., tfds.core.DatasetBuilder]] = {
    "shapes": _shapes,
    "coco_folder": _coco_folder,
    "voc_folder": _voc_folder,
    "yolo_folder": _yolo_folder,
}


# Dataset names that stand for a prepared TFDS dataset plus (dataset, split) pairs read
# after cfg.data.train_split for training (before cfg.data.extra_train_sets).
ALIASES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "voc": ("voc/2007", (("voc/2012", "trainval"),)),  # the original's VOC0712
}


def data_dir_of(cfg) -> str:
    """cfg.data.data_dir as a string (None: TFDS's default ~/tensorflow_datasets)."""
    return as_str(cfg.data.data_dir or "~/tensorflow_datasets")


def train_source(cfg, builder: tfds.core.DatasetBuilder, split: str | None = None):
    """The training records: `split` (default cfg.data.train_split) of `builder`, followed
    by the alias's sets (`ALIASES`: "voc" adds voc/2012 trainval) and every (dataset,
    split) of cfg.data.extra_train_sets, all prepared in the same data_dir with the same
    classes."""
    sources = [schema.data_source(builder, split or cfg.data.train_split)]
    alias_extra = ALIASES.get(cfg.data.dataset, ("", ()))[1]
    for name, extra_split in (*alias_extra, *cfg.data.extra_train_sets):
        other = prepared_builder(name, data_dir_of(cfg))
        if schema.class_names(other) != schema.class_names(builder):
            raise ValueError(
                f"data.extra_train_sets: {name!r} has classes {schema.class_names(other)}, "
                f"{cfg.data.dataset!r} has {schema.class_names(builder)}"
            )
        sources.append(schema.data_source(other, extra_split))
    return sources[0] if len(sources) == 1 else schema.ConcatSource(sources)


def open_builder(cfg, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `cfg.data.dataset`, prepared (generated ones are built).

    Args:
      cfg: config; reads cfg.data.{dataset, data_dir, shapes_*, image_dir, annotation_file,
        eval_image_dir, eval_annotation_file} and cfg.model.num_classes.
      data_dir: overrides cfg.data.data_dir (None there means TFDS's default ~/tensorflow_datasets).
    """
    d = cfg.data
    data_dir = os.fspath(data_dir) if data_dir is not None else d.data_dir
    data_dir = as_str(data_dir or "~/tensorflow_datasets")  # gs://... kept as given
    build = GENERATED.get(d.dataset)
    name = ALIASES.get(d.dataset, (d.dataset,))[0]
    builder = build(d, data_dir) if build else prepared_builder(name, data_dir)
    check_num_classes(cfg, builder)
    return builder


def prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """An already prepared TFDS dataset, opened from its files (no generation code).

    Reading from files needs neither the dataset's builder class (TFDS's `coco` class
    imports TensorFlow) nor the network.
    """
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared under data_dir={data_dir!r}; nothing is "
            f"downloaded here. Prepare it once with the TFDS Python API, e.g. "
            f"tfds.builder({name!r}, data_dir=..., file_format='array_record')"
            f".download_and_prepare(), and set cfg.data.data_dir."
        ) from e


def dataset_labels(builder: tfds.core.DatasetBuilder) -> dict[str, list]:
    """{"class_names", "category_ids"} of model classes 1..C-1 (index k - 1), stored with
    every checkpoint and export so that predictions carry names without the dataset."""
    return {"class_names": schema.class_names(builder),
            "category_ids": coco_json.category_ids(builder)}  # fmt: skip


def known_labels(num_classes: int) -> dict[str, list] | None:
    """The labels of the datasets the original was released for, by class count (81:
    COCO 2017, 21: PASCAL VOC), for converted official checkpoints; else None."""
    if num_classes == len(schema.COCO_2017_CATEGORIES) + 1:
        return {"class_names": [n for _, n in schema.COCO_2017_CATEGORIES],
                "category_ids": list(schema.COCO_2017_CATEGORY_IDS)}  # fmt: skip
    if num_classes == len(VOC_CLASSES) + 1:
        return {"class_names": list(VOC_CLASSES),
                "category_ids": list(range(1, len(VOC_CLASSES) + 1))}  # fmt: skip
    return None


def check_num_classes(cfg, builder: tfds.core.DatasetBuilder) -> None:
    """model.num_classes must hold the dataset's classes plus background 0."""
    n = len(schema.class_names(builder))
    if cfg.model.num_classes < n + 1:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but dataset "
            f"{cfg.data.dataset!r} has {n} classes: set model.num_classes={n + 1} "
            "(classes + background)"
        )
