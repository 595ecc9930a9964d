"""Data sources: the shapes / coco_folder / coco/2017 builders, COCO metadata, open_builder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from m2det_jax.core import box_ops
from m2det_jax.data import builders, coco_json, pipeline, records, schema
from m2det_jax.data.sources.coco_folder import build_coco_folder
from m2det_jax.data.sources.shapes import build_shapes, encode_png
from tests.helpers import small_data_config, stored_records

# ------------------------------------------------------------------------- shapes


def test_shapes_builds_reads_back_and_is_deterministic(shapes_builder, tmp_path):
    train, val = stored_records(shapes_builder, "train"), stored_records(shapes_builder, "validation")
    assert (len(train), len(val)) == (16, 8)
    assert coco_json.category_ids(shapes_builder) == [1, 2, 3, 4]
    for rec in train + val:
        ex, stats = records.decode_record(rec)
        assert ex["image"].shape == (128, 128, 3) and ex["image"].dtype == np.uint8
        assert 1 <= len(ex["boxes"]) <= 6
        assert ((ex["boxes"] >= 0) & (ex["boxes"] <= 1)).all()
        assert (ex["boxes"][:, 2:] > ex["boxes"][:, :2]).all()
        assert set(ex["labels"].tolist()) <= {1, 2, 3, 4}
        assert stats["bad_boxes"] == stats["bad_images"] == 0
    again = build_shapes(tmp_path, num_train=16, num_validation=8)
    a = {int(r["image/id"]): r["image"] for r in train}
    b = {int(r["image/id"]): r["image"] for r in stored_records(again, "train")}
    assert a == b


def test_shapes_coco_json_loads_in_pycocotools_and_matches(shapes_builder):
    coco = COCO(coco_json.annotation_file(shapes_builder, "validation"))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    recs = stored_records(shapes_builder, "validation")
    assert sorted(coco.getImgIds()) == sorted(int(r["image/id"]) for r in recs)
    for rec in recs:
        ex, _ = records.decode_record(rec)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(ex["image_id"])]))
        xywh = np.array([a["bbox"] for a in anns])
        want = box_ops.xyxy_to_xywh(ex["boxes"] * 128.0)
        np.testing.assert_allclose(np.sort(xywh, 0), np.sort(want, 0), atol=1e-3)
        assert sorted(a["category_id"] for a in anns) == sorted(ex["labels"].tolist())


# -------------------------------------------------------------------- coco_folder


def _write_folder(root, images, annotations, categories):
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    ann = root / "instances.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return img_dir, ann


def test_coco_folder_bad_data_is_skipped_and_counted(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    img_dir = root / "images"
    img_dir.mkdir()
    (img_dir / "good.png").write_bytes(encode_png(np.full((40, 50, 3), 200, np.uint8)))
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (img_dir / "sub").mkdir()
    (img_dir / "sub" / "empty.png").write_bytes(encode_png(np.zeros((20, 20, 3), np.uint8)))
    images = [
        {"id": 11, "file_name": "good.png", "width": 50, "height": 40},
        {"id": 12, "file_name": "corrupt.jpg", "width": 30, "height": 30},
        {"id": 13, "file_name": "sub/empty.png", "width": 20, "height": 20},
    ]
    anns = [
        {
            "id": 1,
            "image_id": 11,
            "category_id": 7,
            "bbox": [5, 4, 10, 8],
            "area": 80,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 11,
            "category_id": 3,
            "bbox": [float("nan"), 1, 2, 3],
            "area": 6,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 11,
            "category_id": 3,
            "bbox": [10, 10, -5, 4],
            "area": 0,
            "iscrowd": 0,
        },
        {
            "id": 4,
            "image_id": 11,
            "category_id": 3,
            "bbox": [40, 30, 20, 20],
            "area": 400,
            "iscrowd": 0,
        },  # reaches outside: clipped to [40,30,50,40]
        {
            "id": 5,
            "image_id": 11,
            "category_id": 7,
            "bbox": [0, 0, 50, 40],
            "area": 2000,
            "iscrowd": 1,
        },
        {
            "id": 6,
            "image_id": 11,
            "category_id": 3,
            "bbox": [30, 30, 0, 5],
            "area": 0,
            "iscrowd": 0,
        },  # zero width: degenerate
        {"id": 7, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
    ]
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    builder = build_coco_folder(tmp_path / "tfds", image_dir=img_dir, annotation_file=ann)
    assert coco_json.category_ids(builder) == [3, 7]  # sorted ids: label 0 -> 3, 1 -> 7
    assert builder.info.metadata["build_stats"]["invalid_boxes"] == 2
    assert builder.info.metadata["build_stats"]["clipped_boxes"] == 1

    cfg = small_data_config()
    it = pipeline.make_eval_iterator(
        cfg, builder=builder, split="train", global_batch_size=4, shard_index=0, shard_count=1
    )
    batches = list(it)
    assert len(batches) == 1
    b = batches[0]
    assert sorted(b["image_id"][b["mask"]].tolist()) == [11, 13]  # corrupt image skipped
    i = int(np.flatnonzero(b["image_id"] == 11)[0])
    assert b["valid"][i].sum() == 2
    assert sorted(b["labels"][i][b["valid"][i]].tolist()) == [1, 2]  # 3 -> 1, 7 -> 2
    got = b["boxes"][i][b["valid"][i]][np.argsort(b["labels"][i][b["valid"][i]])]
    np.testing.assert_allclose(
        got, [[40 / 50, 30 / 40, 1, 1], [5 / 50, 4 / 40, 15 / 50, 12 / 40]], atol=1e-6
    )
    assert tuple(b["image_sizes"][i]) == (40, 50)
    s = it.stats.as_dict()
    assert s["bad_images"] == 1 and s["examples"] == 3
    assert s["bad_boxes"] == 3  # NaN + negative width (stored empty) + zero width
    assert s["crowd_boxes"] == 1 and s["empty_images"] == 1


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_coco_folder_refuses_names_outside_the_folder(tmp_path, name):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    (tmp_path / "outside.png").write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8)))
    ann = tmp_path / "instances.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": name, "width": 4, "height": 4}],
                "annotations": [],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build_coco_folder(tmp_path / "tfds", image_dir=img_dir, annotation_file=ann)


# ----------------------------------------------------------------------- coco/2017


def test_coco2017_prepared_dir_through_the_real_reading_code(tmp_path):
    """A prepared `coco/2017` (coco/2017's exact features, array_record) read as in training.

    TFDS's own `coco` builder class needs TensorFlow even to build its `info`, so
    `tfds.testing.mock_data` cannot construct it here; production reads prepared data
    from its files instead (`schema.prepared_builder`). This test prepares a 3-image
    `coco/2017` directory with a stand-in builder and drives the real path.
    """
    names = [n for _, n in schema.COCO_2017_CATEGORIES]
    with tfds.core.registered.skip_registration():

        class Coco(tfds.core.GeneratorBasedBuilder):
            name = "coco"
            VERSION = tfds.core.Version("1.1.0")
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(encoding_format="jpeg"),
                            "image/filename": tfds.features.Text(),
                            "image/id": np.int64,
                            "objects": tfds.features.Sequence(
                                {
                                    "area": np.int64,
                                    "bbox": tfds.features.BBoxFeature(),
                                    "id": np.int64,
                                    "is_crowd": np.bool_,
                                    "label": tfds.features.ClassLabel(names=names),
                                }
                            ),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {"validation": self._generate_examples()}

            def _generate_examples(self):
                for i in range(3):
                    yield (
                        i,
                        {
                            "image": encode_png(np.full((30 + i, 40, 3), 50 * i, np.uint8)),
                            "image/filename": f"{i}.jpg",
                            "image/id": 1000 + i,
                            "objects": [
                                {
                                    "area": 10,
                                    "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
                                    "id": 1,
                                    "is_crowd": False,
                                    "label": 0,
                                },
                                {
                                    "area": 10,
                                    "bbox": tfds.features.BBox(0.0, 0.25, 0.75, 1.0),
                                    "id": 2,
                                    "is_crowd": False,
                                    "label": 79,
                                },
                                {
                                    "area": 99,
                                    "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                                    "id": 3,
                                    "is_crowd": True,
                                    "label": 5,
                                },
                            ],
                        },
                    )

        schema.prepare(Coco(data_dir=str(tmp_path), file_format="array_record"))

    cfg = small_data_config(data_dir=str(tmp_path))
    assert cfg.data.dataset == "coco/2017"
    builder = builders.open_builder(cfg)
    assert coco_json.category_ids(builder) == list(schema.COCO_2017_CATEGORY_IDS)
    assert len(schema.COCO_2017_CATEGORY_IDS) == 80
    it = pipeline.make_eval_iterator(
        cfg, builder=builder, global_batch_size=4, shard_index=0, shard_count=1
    )
    (b,) = list(it)
    assert b["mask"].tolist() == [True, True, True, False]
    assert sorted(b["image_id"][:3].tolist()) == [1000, 1001, 1002]
    order = np.argsort(b["image_id"][:3])
    np.testing.assert_array_equal(b["image_sizes"][:3][order], [[30, 40], [31, 40], [32, 40]])
    np.testing.assert_array_equal(b["labels"][:3, :3], [[1, 80, 0]] * 3)  # 0..79 -> 1..80
    np.testing.assert_allclose(b["boxes"][0, :2], [[0.2, 0.1, 0.6, 0.5], [0.25, 0.0, 1.0, 0.75]])
    assert it.stats.as_dict()["crowd_boxes"] == 3  # dropped by default

    cfg.data.include_crowd = True
    (b,) = list(
        pipeline.make_eval_iterator(
            cfg, builder=builder, global_batch_size=4, shard_index=0, shard_count=1
        )
    )
    assert b["valid"][:3].sum(1).tolist() == [3, 3, 3]

    with pytest.raises(FileNotFoundError, match="not prepared"):
        builders.open_builder(small_data_config(data_dir=str(tmp_path / "empty")))


def test_open_builder_shapes_from_config(tmp_path):
    cfg = small_data_config(
        dataset="shapes",
        data_dir=str(tmp_path),
        shapes_num_train=4,
        shapes_num_validation=2,
        shapes_image_size=32,
    )
    builder = builders.open_builder(cfg)
    assert len(schema.data_source(builder, "validation")) == 2
    assert os.path.exists(coco_json.annotation_file(builder, "train"))


def test_coco_folder_without_iscrowd_or_area_builds_and_evaluates(tmp_path):
    """Labelling tools often omit the optional fields: filled once at the build (counted),
    and evaluation scores against the stored records, never the raw JSON."""
    from m2det_jax.evaluation.coco import coco_evaluate
    from m2det_jax.evaluation.driver import official_annotations

    images, anns = [], []
    for i in range(1, 4):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i}.png").write_bytes(
            encode_png(np.full((40, 50, 3), 30 * i, np.uint8)))  # fmt: skip
        images.append({"id": i, "file_name": f"{i}.png", "width": 50, "height": 40})
        anns.append({"id": i, "image_id": i, "category_id": 3, "bbox": [5, 6, 20, 10 + i]})
    img_dir, ann = _write_folder(tmp_path, images, anns, [{"id": 3, "name": "thing"}])
    cfg = small_data_config(dataset="coco_folder", data_dir=str(tmp_path / "tfds"),
                            image_dir=str(img_dir), annotation_file=str(ann),
                            eval_annotation_file=str(ann))  # fmt: skip
    builder = builders.open_builder(cfg)
    stats = builder.info.metadata["build_stats"]
    assert stats["missing_area"] == stats["missing_iscrowd"] == 6  # train + validation
    assert official_annotations(cfg) is None
    gt = coco_json.ground_truth(builder, "validation")
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0]
    np.testing.assert_allclose(sorted(a["area"] for a in gt["annotations"]), [220, 240, 260])
    results = [{"image_id": a["image_id"], "category_id": 3, "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]  # fmt: skip
    assert coco_evaluate(gt, results)["AP"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="iscrowd"):  # the raw JSON in the reference backend
        coco_evaluate(str(ann), results, backend="pycocotools")


def test_missing_eval_split_is_found_before_training(tmp_path):
    """A coco_folder without eval_annotation_file has no validation split: training says
    so up front and skips the evaluation instead of failing at the end."""
    from m2det_jax.train.data_state import missing_eval_split

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    img_dir, ann = _write_folder(
        tmp_path, [{"id": 1, "file_name": "1.png", "width": 8, "height": 8}], [],
        [{"id": 1, "name": "a"}])  # fmt: skip
    cfg = small_data_config(dataset="coco_folder", data_dir=str(tmp_path / "tfds"),
                            image_dir=str(img_dir), annotation_file=str(ann))  # fmt: skip
    why = missing_eval_split(cfg)
    assert "no split 'validation'" in why and "data.eval_annotation_file" in why
    cfg.data.eval_split = "train"
    assert missing_eval_split(cfg) is None


def test_coco_folder_rebuilt_when_its_json_changes(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(encode_png(np.zeros((40, 50, 3), np.uint8)))
    images = [{"id": 1, "file_name": "1.png", "width": 50, "height": 40}]
    cats = [{"id": 1, "name": "a"}]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 4, 20, 10], "iscrowd": 0}
    img_dir, path = _write_folder(tmp_path, images, [ann], cats)
    cfg = small_data_config(dataset="coco_folder", data_dir=str(tmp_path / "tfds"),
                            image_dir=str(img_dir), annotation_file=str(path))  # fmt: skip
    first = builders.open_builder(cfg)
    assert builders.open_builder(cfg).data_dir == first.data_dir  # unchanged: reused
    _write_folder(tmp_path, images, [{**ann, "bbox": [10, 8, 20, 10]}], cats)
    with caplog.at_level("WARNING"):
        edited = builders.open_builder(cfg)
    assert edited.data_dir != first.data_dir
    assert "inputs changed since the build(s)" in caplog.text
    (rec,) = stored_records(edited, "train")
    np.testing.assert_allclose(np.asarray(rec["objects"]["bbox"]).reshape(-1, 4),
                               [[8 / 40, 10 / 50, 18 / 40, 30 / 50]], atol=1e-6)  # fmt: skip
