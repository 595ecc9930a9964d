"""Data: TFDS builders, COCO reading, augmentation, the grain pipeline (no TensorFlow)."""

from __future__ import annotations

import colorsys
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from m2det_jax.config import default_config
from m2det_jax.data import augment, pipeline, sources
from m2det_jax.data.coco_folder import build_coco_folder
from m2det_jax.data.shapes import build_shapes, encode_png

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("tfds"), num_train=16, num_validation=8)


def small_cfg(**data):
    cfg = default_config()
    cfg.model.input_size = 64
    cfg.data.max_boxes = 8
    cfg.data.num_workers = 0
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def _records(builder, split):
    src = sources.data_source(builder, split)
    return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------------- shapes


def test_shapes_builds_reads_back_and_is_deterministic(shapes_builder, tmp_path):
    train, val = _records(shapes_builder, "train"), _records(shapes_builder, "validation")
    assert (len(train), len(val)) == (16, 8)
    assert sources.category_ids(shapes_builder) == [1, 2, 3, 4]
    for rec in train + val:
        ex, stats = sources.decode_record(rec)
        assert ex["image"].shape == (128, 128, 3) and ex["image"].dtype == np.uint8
        assert 1 <= len(ex["boxes"]) <= 6
        assert ((ex["boxes"] >= 0) & (ex["boxes"] <= 1)).all()
        assert (ex["boxes"][:, 2:] > ex["boxes"][:, :2]).all()
        assert set(ex["labels"].tolist()) <= {1, 2, 3, 4}
        assert stats["bad_boxes"] == stats["bad_images"] == 0
    again = build_shapes(tmp_path, num_train=16, num_validation=8)
    a = {int(r["image/id"]): r["image"] for r in train}
    b = {int(r["image/id"]): r["image"] for r in _records(again, "train")}
    assert a == b


def test_shapes_coco_json_loads_in_pycocotools_and_matches(shapes_builder):
    from pycocotools.coco import COCO

    coco = COCO(sources.annotation_file(shapes_builder, "validation"))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    recs = _records(shapes_builder, "validation")
    assert sorted(coco.getImgIds()) == sorted(int(r["image/id"]) for r in recs)
    for rec in recs:
        ex, _ = sources.decode_record(rec)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(ex["image_id"])]))
        xywh = np.array([a["bbox"] for a in anns])
        want = ex["boxes"] * 128.0
        want[:, 2:] -= want[:, :2]
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
    assert sources.category_ids(builder) == [3, 7]  # sorted ids: label 0 -> 3, 1 -> 7
    assert builder.info.metadata["build_stats"]["invalid_boxes"] == 2
    assert builder.info.metadata["build_stats"]["clipped_boxes"] == 1

    cfg = small_cfg()
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
    assert tuple(b["orig_size"][i]) == (40, 50)
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
    from its files instead (`sources.prepared_builder`). This test prepares a 3-image
    `coco/2017` directory with a stand-in builder and drives the real path.
    """
    names = [n for _, n in sources.COCO_2017_CATEGORIES]
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

        sources.prepare(Coco(data_dir=str(tmp_path), file_format="array_record"))

    cfg = small_cfg(data_dir=str(tmp_path))
    assert cfg.data.dataset == "coco/2017"
    builder = sources.open_builder(cfg)
    assert sources.category_ids(builder) == list(sources.COCO_2017_CATEGORY_IDS)
    assert len(sources.COCO_2017_CATEGORY_IDS) == 80
    it = pipeline.make_eval_iterator(
        cfg, builder=builder, global_batch_size=4, shard_index=0, shard_count=1
    )
    (b,) = list(it)
    assert b["mask"].tolist() == [True, True, True, False]
    assert sorted(b["image_id"][:3].tolist()) == [1000, 1001, 1002]
    order = np.argsort(b["image_id"][:3])
    np.testing.assert_array_equal(b["orig_size"][:3][order], [[30, 40], [31, 40], [32, 40]])
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
        sources.open_builder(small_cfg(data_dir=str(tmp_path / "empty")))


# --------------------------------------------------------------------- augmentation


def _rect_image(h=60, w=80, box=(20, 10, 50, 40)):
    img = np.full((h, w, 3), 90, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (255, 0, 0)
    return img, np.array([box], np.float32)


def _red_bbox(img):
    ys, xs = np.nonzero((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_crop_expand_mirror_boxes_follow_the_pixels():
    img, box = _rect_image()
    labels = np.array([1])
    n_crop = n_exp = n_mir = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out, b, lab = augment.random_crop(img, box, labels, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_crop += out.shape != img.shape
        out, b = augment.expand(img, box, (1, 2, 3), 1.0, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_exp += out.shape != img.shape
        out, b = augment.mirror(img, box, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_mir += not np.array_equal(out, img)
    assert n_crop > 10 and n_exp > 50 and 10 < n_mir < 50


def test_train_augment_deterministic_boxes_in_unit_square():
    rng0 = np.random.default_rng(123)
    img = rng0.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array(
        [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.95, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32
    )
    labels = np.array([1, 2, 3])
    a = augment.train_augment(img, boxes, labels, np.random.default_rng(5), size=32)
    b = augment.train_augment(img, boxes, labels, np.random.default_rng(5), size=32)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    differs = 0
    for seed in range(40):
        out, bx, lab, _ = augment.train_augment(
            img, boxes, labels, np.random.default_rng(seed), size=32
        )
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert len(bx) == len(lab) >= 1
        assert ((bx >= 0) & (bx <= 1)).all() and (bx[:, 2:] > bx[:, :2]).all()
        differs += not np.array_equal(out, a[0])
    assert differs > 30


def test_min_size_filter_falls_back_to_unaugmented_image():
    img = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    # 0.003 wide: even the tightest crop (0.3 * sqrt(2) of the side) keeps it < 0.01
    tiny = np.array([[0.5, 0.5, 0.503, 0.503]], np.float32)
    out, bx, lab, fell_back = augment.train_augment(
        img, tiny, np.array([4]), np.random.default_rng(0), size=32
    )
    assert fell_back
    np.testing.assert_array_equal(bx, tiny)
    assert lab.tolist() == [4]
    assert any(np.array_equal(out, augment.resize(img, 32, f)) for f in augment.INTERPOLATIONS)
    # no boxes: only resized
    out, bx, _, fell_back = augment.train_augment(
        img, np.zeros((0, 4)), np.zeros((0,)), np.random.default_rng(0), size=32
    )
    assert not fell_back and bx.shape == (0, 4)
    assert any(np.array_equal(out, augment.resize(img, 32, f)) for f in augment.INTERPOLATIONS)


def test_hsv_matches_opencv_convention():
    px = np.random.default_rng(1).integers(0, 256, (500, 1, 3), dtype=np.uint8)
    hsv = augment.rgb_to_hsv_cv2(px)
    for p, q in zip(px[:, 0], hsv[:, 0], strict=True):
        h, s, v = colorsys.rgb_to_hsv(*(p / 255.0))
        assert abs(int(q[0]) - round(h * 180) % 180) <= 1 or {int(q[0]), round(h * 180)} == {0, 180}
        assert abs(int(q[1]) - round(s * 255)) <= 1 and int(q[2]) == round(v * 255)
    back = augment.hsv_to_rgb_cv2(hsv).astype(int)
    assert np.abs(back - px).max() <= 5  # uint8 HSV quantization, as in cv2


def test_resize_bilinear_and_normalize():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    np.testing.assert_array_equal(augment.resize_bilinear(img, 4), img)
    half = augment.resize_bilinear(img, 2)  # half-pixel centres: mean of 2x2 blocks
    want = img.reshape(2, 2, 2, 2, 3).astype(float).mean((1, 3))
    np.testing.assert_array_equal(half, np.round(want))
    x = augment.normalize(img, "bgr", (104.0, 117.0, 123.0))
    np.testing.assert_array_equal(x[..., 0], img[..., 2].astype(np.float32) - 104.0)


# ------------------------------------------------------------------------- pipeline


def test_train_batches_shapes_dtypes_padding(shapes_builder):
    cfg = small_cfg(max_boxes=3)
    it = pipeline.make_train_iterator(
        cfg, builder=shapes_builder, global_batch_size=4, shard_index=0, shard_count=1
    )
    b = next(it)
    want = {
        "image": ((4, 64, 64, 3), np.float32),
        "boxes": ((4, 3, 4), np.float32),
        "labels": ((4, 3), np.int32),
        "valid": ((4, 3), np.bool_),
        "image_id": ((4,), np.int64),
        "orig_size": ((4, 2), np.int32),
        "mask": ((4,), np.bool_),
    }
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    assert b["mask"].all() and (b["orig_size"] == 128).all()
    assert (b["labels"][~b["valid"]] == 0).all() and (b["boxes"][~b["valid"]] == 0).all()
    assert ((b["labels"][b["valid"]] >= 1) & (b["labels"][b["valid"]] <= 4)).all()
    assert -124 <= b["image"].min() and b["image"].max() <= 152
    assert it.stats.as_dict()["examples"] == 4


def test_eval_sees_every_image_once_and_shards_are_disjoint(shapes_builder):
    cfg = small_cfg()
    all_ids = sorted(int(r["image/id"]) for r in _records(shapes_builder, "validation"))
    ids = []
    for shard in range(2):  # two hosts: 8 images, per-host batch 3 -> 2 batches each
        it = pipeline.make_eval_iterator(
            cfg, builder=shapes_builder, global_batch_size=6, shard_index=shard, shard_count=2
        )
        batches = list(it)
        assert len(batches) == it.num_batches == 2
        for b in batches:
            assert b["image"].shape[0] == 3
            assert (b["image"][~b["mask"]] == 0).all() and (b["image_id"][~b["mask"]] == -1).all()
            ids += b["image_id"][b["mask"]].tolist()
    assert sorted(ids) == all_ids  # disjoint, complete

    b0 = pipeline.make_eval_iterator(
        cfg, builder=shapes_builder, global_batch_size=8, shard_index=0, shard_count=1
    )
    first = next(b0)
    rec = {int(r["image/id"]): r for r in _records(shapes_builder, "validation")}
    ex, _ = sources.decode_record(rec[int(first["image_id"][0])])
    np.testing.assert_array_equal(
        first["image"][0], augment.normalize(augment.resize_bilinear(ex["image"], 64))
    )
    np.testing.assert_array_equal(first["boxes"][0][first["valid"][0]], ex["boxes"])


def test_train_shards_disjoint(shapes_builder):
    cfg = small_cfg()
    seen = []
    for shard in range(2):
        it = pipeline.make_train_iterator(
            cfg, builder=shapes_builder, global_batch_size=8, shard_index=shard, shard_count=2
        )
        seen.append({i for _ in range(2) for i in next(it)["image_id"].tolist()})
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 8  # one epoch of each 8-image shard


def test_iterator_state_restores_identical_batches(shapes_builder):
    cfg = small_cfg()

    def make():
        return pipeline.make_train_iterator(
            cfg, builder=shapes_builder, global_batch_size=4, seed=7, shard_index=0, shard_count=1
        )

    it = make()
    for _ in range(3):  # crosses the 16-image epoch boundary after the restore point
        next(it)
    state = json.loads(pipeline.state_to_json(it.get_state()))
    want = [next(it) for _ in range(3)]
    it2 = make()
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    assert it2.stats.as_dict() == it.stats.as_dict()


def test_open_builder_shapes_from_config(tmp_path):
    cfg = small_cfg(
        dataset="shapes",
        data_dir=str(tmp_path),
        shapes_num_train=4,
        shapes_num_validation=2,
        shapes_image_size=32,
    )
    builder = sources.open_builder(cfg)
    assert len(sources.data_source(builder, "validation")) == 2
    assert os.path.exists(sources.annotation_file(builder, "train"))


@pytest.mark.slow
def test_worker_processes_match_in_process_and_resume(shapes_builder):
    cfg = small_cfg()

    def make(workers):
        return pipeline.make_train_iterator(
            cfg,
            builder=shapes_builder,
            global_batch_size=4,
            num_workers=workers,
            shard_index=0,
            shard_count=1,
        )

    ref = make(0)
    want = [next(ref) for _ in range(4)]
    it = make(1)
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    del it
    it = make(1)
    it.set_state(state)
    got += [next(it) for _ in range(2)]
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
