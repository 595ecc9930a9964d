"""COCO evaluation: ground truth fed back scores AP 1, category-id mapping, every image of
the split scored once; and `m2det train` end to end on a tiny shapes set."""

import json
import os

import jax
import numpy as np
import pytest

from m2det_jax import data, load_config
from m2det_jax.evaluation.coco import (
    METRIC_NAMES,
    coco_evaluate,
    coco_results_array,
    to_coco_results,
)
from tests.helpers import (
    OVERRIDES,
    assert_same_detections,
    config_path,
    run_worker,
    run_worker_processes,
    tiny_variables,
    worker_env,
)


def _gt_as_detections(builder, split):
    src = data.data_source(builder, split)
    n = len(src)
    k = 8
    boxes = np.zeros((n, k, 4), np.float32)
    classes = np.ones((n, k), np.int32)
    valid = np.zeros((n, k), bool)
    ids = np.zeros(n, np.int64)
    for i in range(n):
        ex, _ = data.decode_record(src[i])
        h, w = ex["image"].shape[:2]
        m = len(ex["boxes"])
        boxes[i, :m] = ex["boxes"] * np.array([w, h, w, h], np.float32)
        classes[i, :m] = ex["labels"]
        valid[i, :m] = True
        ids[i] = ex["image_id"]
    return boxes, classes, valid, ids


def test_ground_truth_as_detections_scores_ap_1(shapes):
    _, builder = shapes
    boxes, classes, valid, ids = _gt_as_detections(builder, "validation")
    scores = np.linspace(1, 0.5, boxes.shape[1])[None].repeat(len(ids), 0)
    res = to_coco_results(boxes, scores, classes, valid, ids, data.category_ids(builder))
    assert len(res) == valid.sum()
    m = coco_evaluate(data.annotation_file(builder, "validation"), res)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert m[name] == pytest.approx(1.0), name
    assert m["AP/circle"] in (pytest.approx(1.0), 0.0)  # 0 only if no circle in 8 images
    # Only class 1's detections, scored on class 1 alone (`m2det eval --classes`): AP 1;
    # over every class the missing ones count.
    cats = data.category_ids(builder)
    only = to_coco_results(boxes, scores, classes, valid & (classes == 1), ids, cats)
    ann = data.annotation_file(builder, "validation")
    one = coco_evaluate(ann, only, category_ids=[cats[0]])
    assert one["AP"] == pytest.approx(1.0) and [k for k in one if k.startswith("AP/")] == [
        f"AP/{data.class_names(builder)[0]}"]
    assert coco_evaluate(ann, only)["AP"] < 0.5
    # A wrong category mapping is caught: shift every class by one.
    wrong = to_coco_results(boxes, scores, classes, valid, ids, [2, 3, 4, 1])
    assert coco_evaluate(data.annotation_file(builder, "validation"), wrong)["AP"] < 0.5


def test_no_detections_gives_zeros_and_missing_images_count(shapes):
    _, builder = shapes
    ann = data.annotation_file(builder, "validation")
    m = coco_evaluate(ann, [])
    assert set(METRIC_NAMES) <= set(m) and m["AP"] == 0.0
    boxes, classes, valid, ids = _gt_as_detections(builder, "validation")
    valid[0] = False  # image 0 gets no detections: its boxes are misses
    scores = np.ones(valid.shape, np.float32)
    res = to_coco_results(boxes, scores, classes, valid, ids, data.category_ids(builder))
    assert coco_evaluate(ann, res, image_ids=ids)["AR100"] < 1.0


def test_both_coco_backends_agree_on_a_noisy_detector(shapes):
    """faster-coco-eval (the default) and pycocotools (the reference): the same 12 numbers
    and per-class APs, from dicts or the [N, 7] array, on jittered, relabelled, duplicated
    and missing detections."""
    _, builder = shapes
    boxes, classes, valid, ids = _gt_as_detections(builder, "validation")
    rng = np.random.default_rng(0)
    boxes = np.concatenate([boxes, boxes], 1) + rng.normal(0, 3, (len(ids), 16, 4))
    classes = np.concatenate([classes, rng.integers(1, 5, classes.shape)], 1)
    valid = np.concatenate([valid, valid], 1) & (rng.random((len(ids), 16)) < 0.85)
    scores = rng.random(valid.shape)
    cats = data.category_ids(builder)
    gt = data.ground_truth(builder, "validation")
    ref = coco_evaluate(gt, to_coco_results(boxes, scores, classes, valid, ids, cats),
                        image_ids=ids, backend="pycocotools")  # fmt: skip
    assert 0.05 < ref["AP"] < 0.95 and len(ref) == 12 + 4
    for results in (to_coco_results(boxes, scores, classes, valid, ids, cats),
                    coco_results_array(boxes, scores, classes, valid, ids, cats)):  # fmt: skip
        fast = coco_evaluate(gt, results, image_ids=ids)
        assert fast.keys() == ref.keys()
        for k in ref:
            assert fast[k] == pytest.approx(ref[k], abs=1e-12), k
    with pytest.raises(ValueError, match="eval.backend='cocoapi'"):
        coco_evaluate(gt, [], backend="cocoapi")


def test_legacy_plus_one_export():
    res = to_coco_results(np.array([[[10, 20, 30, 60]]], np.float32), np.ones((1, 1)),
                          np.ones((1, 1), np.int32), np.ones((1, 1), bool), np.array([7]),
                          [5], pixel_offset=1)  # fmt: skip
    assert res == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 21.0, 41.0],
                    "score": 1.0}]  # fmt: skip


@pytest.mark.slow
def test_train_cli_end_to_end_on_shapes(shapes, tmp_path):
    from m2det_jax.cli import main

    data_dir, _ = shapes
    wd = tmp_path / "run"
    with pytest.raises(SystemExit, match="model.num_classes=4 but dataset 'shapes' has 4"):
        main(["train", "--config", config_path("tiny"), "--workdir", str(tmp_path / "bad"),
              "--config.data.dataset=shapes", f"--config.data.data_dir={data_dir}",
              "--config.data.shapes_num_train=16", "--config.data.shapes_num_validation=8"])
    rc = main(["train", "--config", config_path("tiny"), "--workdir", str(wd),
               "--config.model.num_classes=5", "--config.data.dataset=shapes", f"--config.data.data_dir={data_dir}",
               "--config.data.shapes_num_train=16", "--config.data.shapes_num_validation=8",
               "--config.train.num_steps=3", "--config.train.log_every=1",
               "--config.train.batch_size=4", "--config.data.eval_batch_size=3",
               "--config.postprocess.score_threshold=0.01"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loc_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert {"loss", "loc_loss", "conf_loss", "lr", "images_per_sec"} <= set(r)
    eval_rows = [r for r in rows if "AP50" in r]
    assert eval_rows and set(METRIC_NAMES) <= set(eval_rows[-1])
    em = json.loads((wd / "eval_metrics.json").read_text())
    assert em["num_images"] == 8 and em["step"] == 3  # 8 images, padded batches of 3
    assert (wd / "curves.png").stat().st_size > 10_000  # drawn at the end of training
    assert (wd / "plots" / "pr_curves.png").stat().st_size > 10_000  # the final evaluation
    events = b"".join(p.read_bytes() for p in (wd / "tensorboard").iterdir())
    assert b"eval/detections_0" in events and b"eval/AP50" in events  # sample images
    assert os.path.isfile(wd / "config.json") and os.path.isfile(wd / "command.txt")
    # `m2det eval` on the training workdir reproduces the same numbers.
    cfg_args = ["--config.model.num_classes=5", "--config.data.dataset=shapes", f"--config.data.data_dir={data_dir}",
                "--config.data.shapes_num_train=16", "--config.data.shapes_num_validation=8",
                "--config.data.eval_batch_size=3", "--config.postprocess.score_threshold=0.01"]
    rc = main(["eval", "--config", config_path("tiny"), "--checkpoint", str(wd),
               "--workdir", str(tmp_path / "ev"), *cfg_args])  # fmt: skip
    assert rc == 0
    em2 = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert em2["AP"] == pytest.approx(em["AP"], abs=1e-6)
    assert em2["num_detections"] == em["num_detections"]
    # Without --config (or overrides), `m2det eval` reads the workdir's config.json.
    assert main(["eval", "--checkpoint", str(wd), "--workdir", str(tmp_path / "ev2")]) == 0
    em3 = json.loads((tmp_path / "ev2" / "eval_metrics.json").read_text())
    assert em3["AP"] == pytest.approx(em["AP"], abs=1e-6)


def test_tta_eval_scores_every_image_once(shapes, tmp_path):
    """cfg.tta in evaluation: one size without flip gives the plain detections (through
    the merge's decode round trip); two sizes + flip merge four passes per image and still
    score every image of the split once, written to eval_metrics.json."""
    from m2det_jax import load_config
    from m2det_jax.evaluation.driver import evaluate_variables
    from m2det_jax.evaluation.stream import predict_split

    data_dir, builder = shapes
    base = [*OVERRIDES, "model.num_classes=5", "data.dataset=shapes", f"data.data_dir={data_dir}",
            "data.eval_batch_size=3", "postprocess.score_threshold=0.05"]  # fmt: skip
    cfg = load_config(config_path("tiny"), base)
    v = tiny_variables(cfg)
    plain = predict_split(cfg, v, builder=builder)
    single = predict_split(load_config(config_path("tiny"), [*base, "tta.sizes=(64,)"]), v,
                           builder=builder)  # fmt: skip
    assert_same_detections(single, plain, 1e-3, 1e-5, keys=("classes", "image_id"))

    cfg_multi = load_config(config_path("tiny"), [*base, "tta.sizes=(64,96)", "tta.flip=True"])
    multi = predict_split(cfg_multi, v, builder=builder)
    assert sorted(multi["image_id"]) == sorted(plain["image_id"]) and len(set(plain["image_id"])) == 8
    assert multi["boxes"].shape == plain["boxes"].shape
    assert np.isfinite(multi["boxes"]).all() and multi["valid"].sum() > 0
    # Boxes are in original pixels (128 x 128 shapes images), as the plain path's.
    assert np.abs(multi["boxes"][multi["valid"]]).max() < 10 * 128
    metrics = evaluate_variables(cfg_multi, v, builder=builder, workdir=str(tmp_path))
    written = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert written["num_images"] == 8 and set(METRIC_NAMES) <= set(written)
    assert written["num_detections"] == int(multi["valid"].sum()) == metrics["num_detections"]
    # Streaming scores what the dense path scores: every batch's full [B, K] detections
    # straight from the TTA program (no device compaction, no gather, no per-batch rows),
    # converted once at the end.
    from m2det_jax import data
    from m2det_jax.evaluation.coco import coco_evaluate, coco_results_array
    from m2det_jax.inference import config_for_size, make_tta_fn, prepare_variables

    sizes = (64, 96)
    its = [data.make_eval_iterator(config_for_size(cfg_multi, s), builder=builder) for s in sizes]
    fn, pv, dense_dets = make_tta_fn(cfg_multi, sizes), prepare_variables(cfg_multi, v), []
    for _ in range(its[0].num_batches):
        batches = [next(it) for it in its]
        m = batches[0]["mask"].astype(bool)
        hw = np.where(m[:, None], batches[0]["image_sizes"], 1).astype(np.float32)
        d = jax.device_get(fn(pv, tuple(b["image"] for b in batches), hw))
        dense_dets.append({**{k: np.asarray(d[k])[m] for k in ("boxes", "scores", "classes",
                                                               "valid")},
                           "image_id": batches[0]["image_id"][m]})  # fmt: skip
    cat = {k: np.concatenate([b[k] for b in dense_dets]) for k in dense_dets[0]}
    dense = coco_evaluate(data.ground_truth(builder, cfg.data.eval_split), coco_results_array(
        cat["boxes"], cat["scores"], cat["classes"], cat["valid"], cat["image_id"],
        data.category_ids(builder)), image_ids=cat["image_id"])  # fmt: skip
    assert int(cat["valid"].sum()) == metrics["num_detections"]
    assert {k: dense[k] for k in METRIC_NAMES} == {k: metrics[k] for k in METRIC_NAMES}
    # eval.max_detections: at most that many per image reach the host and the metrics.
    capped = load_config(config_path("tiny"), [*base, "eval.max_detections=3"])
    m3 = evaluate_variables(capped, v, builder=builder)
    assert 0 < m3["num_detections"] <= 3 * 8 and m3["num_images"] == 8


def test_tta_config_errors_name_the_field():
    from m2det_jax import load_config

    with pytest.raises(ValueError, match=r"tta.sizes=\(64, 8\): size 8"):
        load_config(config_path("tiny"), ["tta.sizes=(64,8)"])


@pytest.mark.slow
def test_two_process_eval_plain_and_tta_match_one_process(shapes, tmp_path):
    """Evaluation with two `jax.distributed` processes on localhost (each reads half of
    every eval batch): plain and TTA detections gathered from both hosts equal the
    one-process ones, every image once, and the COCO metrics are the same."""
    data_dir, _ = shapes
    env = worker_env()
    outs = {"two": tmp_path / "two.json", "one": tmp_path / "one.json"}
    run_worker_processes(["eval", str(data_dir), str(outs["two"])], 2, env)
    run_worker(["eval", str(data_dir), str(outs["one"])], env)
    two, one = (json.loads(outs[k].read_text()) for k in ("two", "one"))
    assert two["process_count"] == 2 and one["process_count"] == 1

    def per_image(d):  # image id -> (classes, boxes, scores) of its valid rows
        ends = np.cumsum(d["num_valid"])
        cut = lambda k: np.split(np.asarray(d[k]), ends[:-1])  # noqa: E731
        return {i: rows for i, *rows in zip(d["image_id"], cut("classes"), cut("boxes"),
                                            cut("scores"), strict=True)}  # fmt: skip

    for name in ("plain", "tta"):
        a, b = two[name], one[name]
        assert len(b["image_id"]) == 8 and len(set(b["image_id"])) == 8
        assert sorted(a["image_id"]) == sorted(b["image_id"])  # every image once
        assert sum(b["num_valid"]) > 0
        pa, pb = per_image(a), per_image(b)
        for i in pb:
            np.testing.assert_array_equal(pa[i][0], pb[i][0])
            np.testing.assert_allclose(pa[i][1], pb[i][1], atol=1e-3)
            np.testing.assert_allclose(pa[i][2], pb[i][2], atol=1e-5)
        assert a["metrics"]["num_images"] == 8
        for k in METRIC_NAMES:
            assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=1e-6), (name, k)
    # TTA merged other passes: not the plain rows.
    t, pl = two["tta"], two["plain"]
    assert t["num_valid"] != pl["num_valid"] or t["boxes"] != pl["boxes"]


@pytest.mark.slow
def test_eval_cli_on_two_processes_matches_one(shapes, tmp_path):
    """`m2det eval --coordinator_address ... --num_processes 2 --process_id i` (the same
    flags as train): process 0 writes the metrics of every image, equal to one process's."""
    import socket
    import subprocess
    import sys

    from m2det_jax.checkpoints.variables import save_variables
    from m2det_jax.evaluation.driver import evaluate_variables

    data_dir, _ = shapes
    overrides = ["postprocess.keep_per_class=5", "postprocess.candidates_per_class=50",
                 "model.num_classes=5", "data.dataset=shapes", "data.eval_batch_size=4",
                 "data.shapes_num_train=16", "data.shapes_num_validation=8",
                 "postprocess.score_threshold=0.05", f"data.data_dir={data_dir}",
                 # Winograd convolutions on both sides (tiny needs low thresholds).
                 "eval.winograd=on", "eval.winograd_min_channels=8",
                 "eval.winograd_min_pixels=1"]  # fmt: skip
    cfg = load_config(config_path("tiny"), overrides)
    v = tiny_variables(cfg)
    ckpt = save_variables(tmp_path / "ckpt", v, cfg, source="test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    cmd = [sys.executable, "-m", "m2det_jax.cli", "eval", "--config", config_path("tiny"),
           *(f"--config.{o}" for o in overrides), "--checkpoint", str(ckpt),
           "--workdir", str(tmp_path / "two"), "--coordinator_address", addr,
           "--num_processes", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([*cmd, "--process_id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    two = json.loads((tmp_path / "two" / "eval_metrics.json").read_text())
    one = evaluate_variables(cfg, v)
    assert two["num_images"] == one["num_images"] == 8
    assert two["num_detections"] == one["num_detections"] > 0  # random weights: AP ~0
    assert "rebuilt from the shapes validation records" in two["ground_truth"]
    for k in METRIC_NAMES:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k


def test_compact_detections_keeps_the_top_rows_in_order():
    import jax.numpy as jnp

    from m2det_jax.evaluation.stream import compact_detections

    rng = np.random.default_rng(0)
    b, k = 3, 40
    valid = rng.random((b, k)) < 0.5
    valid[2] = False  # an image without detections
    dets = {"boxes": jnp.asarray(rng.random((b, k, 4)), jnp.float32),
            "scores": jnp.asarray(rng.random((b, k)), jnp.float32),
            "classes": jnp.asarray(rng.integers(1, 5, (b, k)), jnp.int32),
            "valid": jnp.asarray(valid)}  # fmt: skip
    whole = compact_detections(dets, 0)  # no cap: every row as it was
    assert whole["count"].tolist() == valid.sum(1).tolist()
    np.testing.assert_array_equal(whole["scores"], dets["scores"])
    out = compact_detections(dets, 5)
    assert out["scores"].shape == (b, 5) and out["boxes"].shape == (b, 5, 4)
    assert out["count"].tolist() == [min(5, n) for n in valid.sum(1)]
    for i in range(2):
        idx = np.flatnonzero(valid[i])
        top = np.sort(idx[np.argsort(-np.asarray(dets["scores"][i])[idx])[:5]])  # original order
        m = np.asarray(out["valid"][i])
        np.testing.assert_array_equal(np.asarray(out["scores"][i])[m], np.asarray(dets["scores"][i])[top])
        np.testing.assert_array_equal(np.asarray(out["boxes"][i])[m], np.asarray(dets["boxes"][i])[top])
    assert not np.asarray(out["valid"][2]).any()


def test_results_file_and_a_split_without_labels(tmp_path):
    """`evaluate_variables(..., results_file=F)` (`m2det eval --save_results F`) writes every
    detection as COCO results; a split whose annotation file has no boxes is predicted and
    written, not scored."""
    from m2det_jax.cli import main
    from m2det_jax.data.sources.shapes import encode_png
    from m2det_jax.evaluation.driver import evaluate_variables

    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, 5):
        (root / "images" / f"{i}.png").write_bytes(
            encode_png(rng.integers(0, 255, (40, 50, 3), np.uint8)))  # fmt: skip
        images.append({"id": i, "file_name": f"{i}.png", "width": 50, "height": 40})
    cats = [{"id": 7, "name": "thing"}]
    labelled = {"images": images, "categories": cats, "annotations": [
        {"id": i, "image_id": i, "category_id": 7, "bbox": [5, 6, 20, 12]} for i in (1, 2, 3, 4)]}
    (root / "train.json").write_text(json.dumps(labelled))
    (root / "test.json").write_text(json.dumps({**labelled, "annotations": []}))
    overrides = ["data.dataset=coco_folder", f"data.data_dir={tmp_path / 'tfds'}",
                 f"data.image_dir={root / 'images'}", f"data.annotation_file={root / 'train.json'}",
                 "model.num_classes=2", "data.eval_batch_size=2", "data.num_workers=0",
                 "postprocess.score_threshold=0.05", *OVERRIDES]  # fmt: skip
    cfg = load_config(config_path("tiny"), [*overrides,
                                            f"data.eval_annotation_file={root / 'train.json'}"])
    v = tiny_variables(cfg)
    m = evaluate_variables(cfg, v, results_file=str(tmp_path / "labelled.json"))
    rows = json.loads((tmp_path / "labelled.json").read_text())
    assert len(rows) == m["num_detections"] > 0 and "AP" in m
    assert {r["image_id"] for r in rows} <= {1, 2, 3, 4} and {r["category_id"] for r in rows} == {7}
    assert all(len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in rows)
    # The same images, no labels: the same detections, written and not scored.
    unl = load_config(config_path("tiny"), [*overrides,
                                            f"data.eval_annotation_file={root / 'test.json'}"])
    m2 = evaluate_variables(unl, v, results_file=str(tmp_path / "test_dev.json"))
    assert m2 == {"scored": False, "num_images": 4, "num_detections": len(rows)}
    assert json.loads((tmp_path / "test_dev.json").read_text()) == rows
    # Through the CLI.
    from m2det_jax.checkpoints.variables import save_variables

    ckpt = save_variables(tmp_path / "ckpt", v, unl, source="test")
    assert main(["eval", "--config", config_path("tiny"), *(f"--config.{o}" for o in overrides),
                 f"--config.data.eval_annotation_file={root / 'test.json'}", "--checkpoint",
                 str(ckpt), "--workdir", str(tmp_path / "ev"), "--save_results",
                 str(tmp_path / "cli.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "cli.json").read_text()) == rows
    # Run-time NMS choices on eval: class-agnostic, at most 2 per image.
    assert main(["eval", "--config", config_path("tiny"), *(f"--config.{o}" for o in overrides),
                 f"--config.data.eval_annotation_file={root / 'train.json'}", "--checkpoint",
                 str(ckpt), "--workdir", str(tmp_path / "ev2"), "--save_results",
                 str(tmp_path / "two.json"), "--agnostic", "--max_det", "2",
                 "--classes", "1", "--plots"]) == 0  # fmt: skip
    for name in ("pr_curves.png", "confusion_matrix.png", "per_class.md", "worst_images.png"):
        assert (tmp_path / "ev2" / "plots" / name).stat().st_size > 0
    two = json.loads((tmp_path / "two.json").read_text())
    per_image = [sum(r["image_id"] == i for r in two) for i in (1, 2, 3, 4)]
    assert 0 < len(two) and max(per_image) <= 2 < max(sum(r["image_id"] == i for r in rows)
                                                         for i in (1, 2, 3, 4))
