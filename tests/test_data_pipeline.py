"""The grain pipeline: batch layout, eval coverage and sharding, exact resume, workers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2det_jax.data import augment_host as augment
from m2det_jax.data import iterator, pipeline, records
from tests.helpers import small_data_config, stored_records


def test_train_batches_shapes_dtypes_padding(shapes_builder):
    cfg = small_data_config(max_boxes=3)
    it = pipeline.make_train_iterator(
        cfg, builder=shapes_builder, global_batch_size=4, shard_index=0, shard_count=1
    )
    b = next(it)
    want = {
        "image": ((4, 64, 64, 3), np.uint8),
        "boxes": ((4, 3, 4), np.float32),
        "labels": ((4, 3), np.int32),
        "valid": ((4, 3), np.bool_),
        "image_id": ((4,), np.int64),
        "image_sizes": ((4, 2), np.int32),
        "mask": ((4,), np.bool_),
    }
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    assert b["mask"].all() and (b["image_sizes"] == 128).all()
    assert (b["labels"][~b["valid"]] == 0).all() and (b["boxes"][~b["valid"]] == 0).all()
    assert ((b["labels"][b["valid"]] >= 1) & (b["labels"][b["valid"]] <= 4)).all()
    assert len(np.unique(b["image"])) > 50  # real pixels, not a constant
    assert it.stats.as_dict()["examples"] == 4


def test_eval_sees_every_image_once_and_shards_are_disjoint(shapes_builder):
    cfg = small_data_config()
    all_ids = sorted(int(r["image/id"]) for r in stored_records(shapes_builder, "validation"))
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
    rec = {int(r["image/id"]): r for r in stored_records(shapes_builder, "validation")}
    ex, _ = records.decode_record(rec[int(first["image_id"][0])])
    assert first["image"].dtype == np.uint8  # uint8 to the device; preprocess runs there
    np.testing.assert_array_equal(first["image"][0], augment.resize(ex["image"], 64))
    np.testing.assert_array_equal(first["boxes"][0][first["valid"][0]], ex["boxes"])


def test_train_shards_disjoint(shapes_builder):
    cfg = small_data_config()
    seen = []
    for shard in range(2):
        it = pipeline.make_train_iterator(
            cfg, builder=shapes_builder, global_batch_size=8, shard_index=shard, shard_count=2
        )
        seen.append({i for _ in range(2) for i in next(it)["image_id"].tolist()})
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 8  # one epoch of each 8-image shard


def test_iterator_state_restores_identical_batches(shapes_builder):
    cfg = small_data_config()

    def make():
        return pipeline.make_train_iterator(
            cfg, builder=shapes_builder, global_batch_size=4, seed=7, shard_index=0, shard_count=1
        )

    it = make()
    for _ in range(3):  # crosses the 16-image epoch boundary after the restore point
        next(it)
    state = json.loads(iterator.state_to_json(it.get_state()))
    want = [next(it) for _ in range(3)]
    it2 = make()
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    assert it2.stats.as_dict() == it.stats.as_dict()


@pytest.mark.slow
def test_worker_processes_match_in_process_and_resume(shapes_builder):
    cfg = small_data_config()

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


def _coco_folder(tmp_path, n_images, n_corrupt):
    """A coco_folder of n_images PNGs with one box each, the first n_corrupt not images."""
    from m2det_jax.data.builders import open_builder
    from m2det_jax.data.sources.shapes import encode_png

    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(1, n_images + 1):
        raw = b"not an image" if i <= n_corrupt else encode_png(np.zeros((32, 32, 3), np.uint8))
        (tmp_path / "images" / f"{i}.png").write_bytes(raw)
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 10, 10],
                     "iscrowd": 0, "area": 100})  # fmt: skip
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    cfg = small_data_config(dataset="coco_folder", data_dir=str(tmp_path / "tfds"),
                            image_dir=str(tmp_path / "images"), annotation_file=str(ann))  # fmt: skip
    return cfg, open_builder(cfg)


def test_all_corrupt_training_set_is_an_error_not_a_spin(tmp_path):
    cfg, builder = _coco_folder(tmp_path, 8, 8)
    it = pipeline.make_train_iterator(cfg, builder=builder, global_batch_size=4, shard_count=1)
    with pytest.raises(iterator.BadDataError, match=r"64 of the 64 examples.*data.max_bad_fraction=0.5"):
        for _ in range(17):  # bad slots stay in their batch (masked) until 64 were read
            assert not next(it)["mask"].any()


def test_a_few_corrupt_images_are_skipped_and_counted(tmp_path):
    cfg, builder = _coco_folder(tmp_path, 8, 1)
    it = pipeline.make_train_iterator(cfg, builder=builder, global_batch_size=4, shard_count=1)
    masked = sum(int((~next(it)["mask"]).sum()) for _ in range(20))  # 80 slots, 10 epochs
    c = it.stats.counts
    # An undecodable image keeps its slot, masked (the global batch order stays the same on
    # any number of hosts): 1 of the 8 images, in each of the 10 epochs.
    assert c["examples"] == 80 and c["bad_images"] == masked == 10
