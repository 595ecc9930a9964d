"""PASCAL VOC data: the VOC-format folder builder, TFDS voc/2007 through the same reader,
07+12-style concatenation, difficult objects, the VOC metric end to end, fine-tuning onto
another number of classes."""

import json
import logging
import os

import numpy as np
import pytest

from m2det_jax import data, load_config
from m2det_jax.evaluation.coco import coco_evaluate, to_coco_results
from m2det_jax.evaluation.driver import voc_metrics
from m2det_jax.evaluation.stream import per_image
from m2det_jax.evaluation.voc import is_voc, voc_ground_truth, write_voc_results
from tests.helpers import (
    OVERRIDES,
    config_path,
    small_data_config,
    stored_records,
    voc_xml,
    write_voc_folder,
)

CLASSES = ("cat", "dog", "bird")


def _voc_cfg(root, data_dir, **extra):
    return small_data_config(dataset="voc_folder", root=str(root), data_dir=str(data_dir),
                             train_split="trainval", eval_split="test", **extra)  # fmt: skip


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOC"
    write_voc_folder(str(root), CLASSES, {"trainval": 12, "test": 6})
    return root


def _break(root):
    """One corrupt XML, one corrupt image, one box with xmax <= xmin, in trainval."""
    with open(root / "Annotations" / "000001.xml", "w") as f:
        f.write("<annotation><object>")
    with open(root / "JPEGImages" / "000002.jpg", "wb") as f:
        f.write(b"not a jpeg")
    with open(root / "Annotations" / "000003.xml", "w") as f:
        f.write(voc_xml("000003", 96, 80, [("cat", (10, 10, 40, 40), False),
                                           ("dog", (50, 10, 50, 30), False)]))  # fmt: skip


def test_voc_folder_builds_validates_and_reads(tmp_path):
    root = tmp_path / "VOC"
    truth = write_voc_folder(str(root), CLASSES, {"trainval": 8, "test": 4})
    _break(root)
    cfg = _voc_cfg(root, tmp_path / "tfds")
    builder = data.open_builder(cfg)
    assert data.class_names(builder) == sorted(CLASSES)  # inferred, sorted
    assert is_voc(builder)
    stats = builder.info.metadata["build_stats"]
    assert (stats["bad_xml"], stats["bad_images"], stats["bad_boxes"]) == (1, 1, 1)
    assert any("000001.xml" in s for s in stats["skipped_files"])
    assert any("000002.jpg" in s for s in stats["skipped_files"])
    recs = stored_records(builder, "trainval")
    assert len(recs) == 6 and len(stored_records(builder, "test")) == 4
    names = sorted(CLASSES)
    for rec in recs:
        fname = rec["image/filename"]
        image_id = (fname.decode() if isinstance(fname, bytes) else str(fname))[:-4]
        assert int(rec["image/id"]) == int(image_id)
        want = truth[image_id] if image_id != "000003" else [("cat", (10, 10, 40, 40), False)]
        yxyx = np.asarray(rec["objects"]["bbox"]).reshape(-1, 4)
        # The XML's pixels / size, unshifted (as TFDS's voc builder stores them).
        np.testing.assert_allclose(yxyx * [80, 96, 80, 96],
                                   [[b[1], b[0], b[3], b[2]] for _, b, _ in want], atol=1e-4)
        assert [names[i] for i in rec["objects"]["label"]] == [c for c, _, _ in want]
        assert list(rec["objects"]["is_difficult"]) == [d for _, _, d in want]

    # Difficult boxes: dropped (counted) in training unless data.keep_difficult.
    it = data.make_train_iterator(cfg, builder=builder, global_batch_size=6, shard_count=1)
    next(it)
    assert it.stats.counts["difficult_boxes"] > 0
    cfg.data.keep_difficult = True
    it = data.make_train_iterator(cfg, builder=builder, global_batch_size=6, shard_count=1)
    next(it)
    assert it.stats.counts["difficult_boxes"] == 0


def test_voc_folder_refuses_unknown_classes_and_escaping_ids(tmp_path, voc_root):
    cfg = _voc_cfg(voc_root, tmp_path / "tfds", class_names=("cat", "dog"))
    with pytest.raises(ValueError, match=r"\.xml: class 'bird' is not in data.class_names"):
        data.open_builder(cfg)
    root = tmp_path / "bad"
    write_voc_folder(str(root), CLASSES, {"trainval": 2})
    with open(root / "ImageSets" / "Main" / "trainval.txt", "a") as f:
        f.write("../../etc/passwd\n")
    with pytest.raises(ValueError, match=r"trainval.txt.*'\.\.' is refused"):
        data.open_builder(_voc_cfg(root, tmp_path / "tfds"))


def test_voc_folder_rebuilds_when_annotations_change(tmp_path, caplog):
    root = tmp_path / "VOC"
    write_voc_folder(str(root), CLASSES, {"trainval": 3, "test": 1})
    cfg = _voc_cfg(root, tmp_path / "tfds")
    first = data.open_builder(cfg)
    again = data.open_builder(cfg)
    assert again.data_dir == first.data_dir  # unchanged inputs: the same build
    xml = root / "Annotations" / "000001.xml"
    xml.write_text(voc_xml("000001", 96, 80, [("dog", (5, 6, 30, 40), False)]))
    st = os.stat(xml)
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level("WARNING"):
        edited = data.open_builder(cfg)
    assert edited.data_dir != first.data_dir
    assert "its inputs changed since the build(s)" in caplog.text
    (rec,) = [r for r in stored_records(edited, "trainval") if int(r["image/id"]) == 1]
    np.testing.assert_allclose(np.asarray(rec["objects"]["bbox"]).reshape(-1, 4),
                               [[6 / 80, 5 / 96, 40 / 80, 30 / 96]], atol=1e-6)  # fmt: skip


def _ground_truth_as_detections(cfg, builder, split):
    """What `predict_split` returns if the network output the eval pipeline's boxes."""
    rows = {"boxes": [], "scores": [], "classes": [], "valid": [], "image_id": []}
    it = data.make_eval_iterator(cfg, builder=builder, split=split, global_batch_size=4,
                                 shard_count=1)  # fmt: skip
    for _ in range(it.num_batches):
        b = next(it)
        m = b["mask"]
        hw = b["image_sizes"][:, ::-1].astype(np.float64)  # (width, height)
        rows["boxes"].append((b["boxes"] * np.tile(hw, 2)[:, None, :])[m])
        rows["scores"].append(np.where(b["valid"], 0.9, 0.0)[m])
        rows["classes"].append(np.where(b["valid"], b["labels"], 1)[m])
        rows["valid"].append(b["valid"][m])
        rows["image_id"].append(b["image_id"][m])
    return {k: np.concatenate(v) for k, v in rows.items()}


def test_ground_truth_fed_back_scores_one_on_both_metrics(tmp_path, voc_root):
    cfg = _voc_cfg(voc_root, tmp_path / "tfds")
    builder = data.open_builder(cfg)
    preds = _ground_truth_as_detections(cfg, builder, "test")
    assert preds["valid"].sum() > 0
    m = voc_metrics(cfg, builder, "test", preds)
    assert m["mAP"] == pytest.approx(1.0) and m["num_images"] == 6
    assert set(m) >= {f"AP/{c}" for c in CLASSES}
    # One box moved off its object: that class's AP drops below 1.
    preds["boxes"][0, 0] += 30.0
    assert voc_metrics(cfg, builder, "test", preds)["mAP"] < 1.0
    preds["boxes"][0, 0] -= 30.0
    # The devkit's per-class files (`m2det eval --save_results` on VOC): file stems,
    # 1-based corners, one line per detection, in its class's file.
    gt = voc_ground_truth(builder, "test")
    paths = write_voc_results(tmp_path / "voc_out", "test", per_image(preds), gt, CLASSES)
    assert [os.path.basename(p) for p in paths] == [f"comp4_det_test_{c}.txt" for c in CLASSES]
    lines = {c: open(p).read().splitlines() for c, p in zip(CLASSES, paths, strict=True)}
    assert sum(map(len, lines.values())) == preds["valid"].sum()
    by_name = {v["name"]: v for v in gt.values()}
    for k, c in enumerate(CLASSES, start=1):
        for line in lines[c]:
            name, score, *box = line.split()
            assert float(score) == 0.9 and len(name) == 6 and name.isdigit()
            want = by_name[name]["boxes"][by_name[name]["labels"] == k] + 1
            assert np.abs(want - np.array(box, float)).max(axis=1).min() < 0.06
    # COCO's metric on the same VOC set: difficult boxes are ignore regions.
    results = to_coco_results(preds["boxes"], preds["scores"], preds["classes"],
                              preds["valid"], preds["image_id"], data.category_ids(builder))  # fmt: skip
    coco = coco_evaluate(data.ground_truth(builder, "test"), results, preds["image_id"])
    assert coco["AP50"] == pytest.approx(1.0)


def _prepare_tfds_voc(tmp_path, monkeypatch):
    """TFDS's own voc/2007 and voc/2012 builders, prepared (array_record) from a local
    VOCdevkit (the download step returns it)."""
    import tensorflow_datasets as tfds
    devkit = tmp_path / "devkit"
    for year, splits in (("2007", {"train": 5, "val": 3, "test": 4}),
                         ("2012", {"train": 3, "val": 2, "test": 1})):  # fmt: skip
        write_voc_folder(str(devkit / "VOCdevkit" / f"VOC{year}"), ("cat", "dog", "person"),
                         splits, seed=int(year))  # fmt: skip
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        lambda self, urls: {k: str(devkit) for k in urls})  # fmt: skip
    data_dir = tmp_path / "tfds"
    for name in ("voc/2007", "voc/2012"):
        tfds.builder(name, data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


@pytest.mark.tensorflow  # TFDS's own voc builders prepare through TensorFlow
def test_tfds_voc0712_reads_concatenates_and_scores(tmp_path, monkeypatch):
    data_dir = _prepare_tfds_voc(tmp_path, monkeypatch)
    cfg = load_config(config_path("m2det320_vgg_voc"), [
        f"data.data_dir={data_dir}", "data.num_workers=0", "data.max_boxes=8"])  # fmt: skip
    assert cfg.data.dataset == "voc"
    builder = data.open_builder(cfg)  # voc/2007, read-only, from the prepared files
    assert is_voc(builder) and len(data.class_names(builder)) == 20
    # 2007 "trainval" = train + validation (8), then 2012's (5): one source of 13 records.
    from m2det_jax.data.builders import train_source
    from m2det_jax.train.data_state import tfds_train_data

    assert len(train_source(cfg, builder)) == 13
    assert tfds_train_data(cfg)[1] == 13  # the epoch length training uses
    cfg.data.extra_train_sets = (("voc/2007", "test"),)  # more sets can follow
    assert len(train_source(cfg, builder)) == 17
    it = data.make_train_iterator(cfg, builder=builder, global_batch_size=4, shard_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 320, 320, 3) and batch["valid"].any()
    # Records carry no image/id: ids come from the file names, as VOC numbers them.
    preds = _ground_truth_as_detections(cfg, builder, "test")
    assert sorted(preds["image_id"].tolist()) == [9, 10, 11, 12]
    assert voc_metrics(cfg, builder, "test", preds)["mAP"] == pytest.approx(1.0)
    assert set(os.listdir(data_dir / "voc" / "2007")) == {"5.0.0"}  # nothing written into it


def test_voc_config_reads_a_voc_folder_as_is(tmp_path, voc_root):
    """The user's command: the VOC config with dataset=voc_folder and root (trainval.txt
    to train, test.txt to evaluate); no voc/2012 is needed."""
    cfg = load_config(config_path("m2det320_vgg_voc"), [
        "data.dataset=voc_folder", f"data.root={voc_root}", f"data.data_dir={tmp_path}",
        "model.num_classes=4", "data.num_workers=0"])  # fmt: skip
    builder = data.open_builder(cfg)
    from m2det_jax.data.builders import train_source
    from m2det_jax.evaluation.driver import metric_of

    assert len(train_source(cfg, builder)) == 12 and metric_of(cfg, builder) == "voc"
    assert len(data.data_source(builder, cfg.data.eval_split)) == 6


@pytest.mark.slow
def test_train_eval_and_finetune_onto_other_classes(tmp_path, caplog):
    """Tiny model: trained on a 5-class VOC-format folder (VOC mAP at the end), then
    fine-tuned onto a 3-class one from that checkpoint: every tensor but the class heads
    loads, and the log names each head tensor left out."""
    import jax

    from m2det_jax.checkpoints.variables import load_init_variables, load_variables, read_labels
    from m2det_jax.train.loop import train_and_evaluate

    five = ("a", "b", "c", "d", "e")
    write_voc_folder(str(tmp_path / "five"), five, {"trainval": 16, "test": 4}, per_image=3)
    write_voc_folder(str(tmp_path / "three"), CLASSES, {"trainval": 8, "test": 4}, seed=1)
    common = [*OVERRIDES, f"data.data_dir={tmp_path / 'tfds'}", "data.dataset=voc_folder",
              "data.train_split=trainval", "data.eval_split=test", "data.num_workers=0",
              "train.num_steps=3", "train.log_every=1", "train.checkpoint_every=3",
              "train.batch_size=4", "data.eval_batch_size=4"]  # fmt: skip
    cfg5 = load_config(config_path("tiny"), [*common, f"data.root={tmp_path / 'five'}",
                                             "model.num_classes=6"])  # fmt: skip
    r = train_and_evaluate(cfg5, str(tmp_path / "run5"), progress=False)
    m = r["eval_metrics"]
    assert 0.0 <= m["mAP"] <= 1.0 and set(m) >= {f"AP/{c}" for c in five}
    rows = [json.loads(line) for line in (tmp_path / "run5" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(r["data_examples"] >= 4 * r["step"] for r in train_rows)
    assert train_rows[-1]["data_difficult_boxes"] > 0  # the pipeline's counts, logged
    saved = json.loads((tmp_path / "run5" / "eval_metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(m["mAP"])
    # The dataset's class names travel with the training checkpoints.
    assert read_labels(str(tmp_path / "run5")) == {"class_names": list(five),
                                                   "category_ids": [1, 2, 3, 4, 5]}  # fmt: skip

    cfg3 = load_config(config_path("tiny"), [
        *common, f"data.root={tmp_path / 'three'}", "model.num_classes=4",
        f"train.init_checkpoint={tmp_path / 'run5'}", "train.eval_every=-1"])  # fmt: skip
    init, skipped = load_init_variables(str(tmp_path / "run5"), cfg3)
    src = load_variables(str(tmp_path / "run5"), cfg5)
    heads = {k for k in src["params"] if k.startswith("conf_")}
    assert heads and not heads & set(init["params"])
    assert len(skipped) == 2 * len(heads) and all("re-initialised" in s for s in skipped)
    for k in set(src["params"]) - heads:
        for a, b in zip(jax.tree.leaves(src["params"][k]), jax.tree.leaves(init["params"][k]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="m2det_jax")
    r3 = train_and_evaluate(cfg3, str(tmp_path / "run3"), progress=False)
    out = caplog.text
    assert r3["step"] == 3 and "not loaded: params/conf_0/bias" in out
    assert "written for 6 classes, config has 4" in out
