"""`m2det detect` on a folder (with a corrupt file) and test-time augmentation properties,
on configs/tiny.py with random weights (loc head scaled down so boxes stay finite)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from m2det_jax import load_config
from m2det_jax.checkpoints.variables import save_variables
from m2det_jax.inference.detector import make_detector, tta_passes
from tests.helpers import (
    OVERRIDES,
    assert_same_detections,
    config_path,
    run_worker,
    tiny_variables,
    worker_env,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(config_path("tiny"), OVERRIDES)
    v = tiny_variables(cfg)
    labels = {"class_names": ["circle", "square", "triangle"], "category_ids": [1, 2, 3]}
    ckpt = save_variables(tmp_path_factory.mktemp("ckpt") / "vars", v, cfg, source="test",
                          labels=labels)  # fmt: skip
    return cfg, v, ckpt


def _mirror(b):
    return jnp.stack([1.0 - b[..., 2], b[..., 1], 1.0 - b[..., 0], b[..., 3]], -1)


def test_detect_cli_folder_with_corrupt_file(setup, tmp_path, capsys):
    from m2det_jax.cli import main

    _, _, ckpt = setup
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(src / "b.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    rc = main(
        [
            "detect",
            "--config",
            config_path("tiny"),
            *("--config." + o for o in OVERRIDES),
            "--checkpoint",
            str(ckpt),
            "--input",
            str(src),
            "--output",
            str(out),
            "--score_threshold",
            "0.2",
        ]  # no --class_names: the names stored with the checkpoint label the boxes
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "detections.json"]
    rows = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(r["file"]) for r in rows] == ["a.png", "b.png"]
    assert (rows[0]["width"], rows[0]["height"]) == (80, 48)
    assert Image.open(out / "a.png").size == (80, 48)
    for r in rows:
        for d in r["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
            assert d["score"] >= 0.2 and 1 <= d["class"] <= 3
            assert d["label"] == ["circle", "square", "triangle"][d["class"] - 1]
    assert sum(len(r["detections"]) for r in rows) > 0  # conf x5: some confident rows


def test_flip_pass_mirrors_back(setup):
    cfg, v, _ = setup
    rng = np.random.default_rng(1)
    half = rng.integers(0, 255, (64, 32, 3), np.uint8)
    sym = np.concatenate([half, half[:, ::-1]], axis=1)  # symmetric, already 64 x 64
    (b0, s0), (b1, s1) = tta_passes(v, [sym], cfg, (64,), flip=True)
    # Same input twice: the flipped pass is the plain one, mirrored.
    np.testing.assert_allclose(b1, _mirror(b0), atol=1e-6)
    np.testing.assert_allclose(s1, s0, atol=1e-6)
    # Any image: the flipped pass of X is the plain pass of flip(X), mirrored.
    x = rng.integers(0, 255, (64, 64, 3), np.uint8)
    (_, _), (bf, sf) = tta_passes(v, [x], cfg, (64,), flip=True)
    (bp, sp), _ = tta_passes(v, [np.ascontiguousarray(x[:, ::-1])], cfg, (64,), flip=True)
    np.testing.assert_allclose(bf, _mirror(bp), atol=1e-6)
    np.testing.assert_allclose(sf, sp, atol=1e-6)


def test_tta_single_size_equals_plain_detect_and_shapes_fixed(setup):
    cfg, v, _ = setup
    rng = np.random.default_rng(2)
    ims = [rng.integers(0, 255, (50, 70, 3), np.uint8), rng.integers(0, 255, (64, 64, 3), np.uint8)]
    plain = make_detector(cfg, v, batch_size=2)(ims)
    tta = make_detector(cfg, v, batch_size=2, tta_sizes=(64,))(ims)
    assert_same_detections(tta, plain, 1e-3, 1e-5)
    # Several sizes + flip: 4 passes merged, same fixed output layout.
    multi = make_detector(cfg, v, batch_size=2, tta_sizes=(64, 96), tta_flip=True)(ims)
    for k in plain:
        assert multi[k].shape == plain[k].shape, k
    assert np.isfinite(multi["boxes"]).all() and multi["valid"].sum() > 0


@pytest.mark.slow
def test_detector_on_8_devices_equals_one_plain_tta_and_folded(tmp_path):
    """`m2det detect`'s batch (plain, and TTA of 2 sizes + flip) split over 8 devices gives
    the one-device detections; folded BatchNorm with Winograd convolutions gives them too."""
    out = tmp_path / "detect8.json"
    run_worker(["detect8", out], worker_env())
    d = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in json.loads(out.read_text()).items()}
    for mode in ("plain", "tta"):
        for bn in ("bn", "fold"):
            assert_same_detections(d[f"eight_{mode}_{bn}"], d[f"one_{mode}_{bn}"], 1e-4, 1e-5)
        assert_same_detections(d[f"one_{mode}_fold"], d[f"one_{mode}_bn"], 1e-3, 1e-4)


def test_one_call_detector_from_a_checkpoint(setup, tmp_path):
    """`m2det_jax.Detector.from_checkpoint`: the config and class names stored with the
    checkpoint; paths, arrays, lists and batches in; the detections `m2det detect` writes."""
    import m2det_jax
    from m2det_jax.inference.image_files import detections_to_records

    cfg, v, ckpt = setup
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (48, 80, 3), np.uint8)
    b = rng.integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    det = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.2,
                                             batch_size=2)  # fmt: skip
    assert det.cfg.model.num_classes == cfg.model.num_classes
    assert det.class_names == ["circle", "square", "triangle"]
    one = det(str(tmp_path / "a.png"))
    assert isinstance(one, m2det_jax.Detections) and len(one) > 0
    dets = make_detector(cfg, v, batch_size=2)([a, b])
    want = detections_to_records(dets, 0, 80, 48, 0.2, det.class_names)
    assert one.to_json() == want
    assert one.boxes.shape == (len(want), 4) and list(one.scores) == pytest.approx(
        [w["score"] for w in want])  # fmt: skip
    assert one.names == [w["label"] for w in want]
    assert one.draw().size == (80, 48)
    both = det([a, b])
    assert [x.to_json() for x in both] == [want, detections_to_records(dets, 1, 64, 64, 0.2,
                                                                        det.class_names)]
    batch = det(np.stack([a, a, a]))  # 3 images in batches of 2
    assert [x.to_json() for x in batch] == [want] * 3
    with pytest.raises(ValueError, match="shape"):
        det(np.zeros((4, 4), np.uint8))
    # A workdir-style folder: its config.json wins over the stored config.
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg.to_json_best_effort())
    other = m2det_jax.Detector.from_checkpoint(ckpt, config=str(cfg_file),
                                               overrides=["postprocess.score_threshold=0.5"],
                                               score_threshold=0.0)  # fmt: skip
    assert other.cfg.postprocess.score_threshold == 0.5


def test_class_filter_and_max_det(setup, tmp_path):
    """A class filter (names or ids) keeps exactly the rows of those classes, `max_det`
    the highest-scoring rows; the same through `m2det detect --classes --max_det`."""
    import m2det_jax
    from m2det_jax.cli import main
    from m2det_jax.inference.image_files import class_ids

    _, _, ckpt = setup
    names = ["circle", "square", "triangle"]
    assert class_ids("square,1", names) == {2, 1} and class_ids([3], names) == {3}
    assert class_ids(None, names) is None
    with pytest.raises(ValueError, match="'hexagon'.*circle, square, triangle"):
        class_ids("hexagon", names)
    im = np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8)
    det = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.0)
    every = det(im).to_json()
    assert {d["class"] for d in every} == {1, 2, 3}
    only = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.0,
                                              classes="square,3")(im).to_json()  # fmt: skip
    assert only == [d for d in every if d["class"] in (2, 3)]
    top = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.0,
                                             max_det=4)(im).to_json()  # fmt: skip
    assert top == every[:4]
    agn = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.0,
                                             agnostic=True)  # fmt: skip
    assert agn.cfg.postprocess.class_agnostic and not det.cfg.postprocess.class_agnostic
    one_each = agn(im).to_json()  # one NMS over all classes: fewer rows, one class per box
    assert 0 < len(one_each) < len(every)
    assert len({tuple(d["box"]) for d in one_each}) == len(one_each)

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(im).save(src / "a.png")
    args = ["detect", "--config", config_path("tiny"), *("--config." + o for o in OVERRIDES),
            "--checkpoint", str(ckpt), "--input", str(src), "--score_threshold", "0"]
    assert main([*args, "--output", str(tmp_path / "o"), "--classes", "circle",
                 "--max_det", "3"]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "o" / "detections.json").read_text())[0]["detections"]
    assert rows == [d for d in every if d["class"] == 1][:3]
    with pytest.raises(SystemExit, match="--classes.*'hexagon'"):
        main([*args, "--output", str(tmp_path / "p"), "--classes", "hexagon"])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_only_when_asked(tmp_path, orientation):
    from PIL import ImageOps

    from m2det_jax.inference.image_files import load_image

    stored = np.zeros((30, 50, 3), np.uint8)
    stored[:10, :20] = (255, 0, 0)  # a red corner: every turn moves it
    path = tmp_path / "phone.png"  # lossless, so pixels compare exactly
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(load_image(str(path)), stored)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(load_image(str(path), exif=True), want)
    assert (want.shape[:2] == (50, 30)) == (orientation >= 5)


@pytest.mark.parametrize("name,fourcc", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_detect_on_a_video_file(setup, tmp_path, name, fourcc):
    """`m2det detect --input clip.avi`: every frame in order through the batched detector,
    an annotated video of the same frame rate and size, one detections.jsonl line per
    frame; `--max_frames` stops early."""
    import cv2

    import m2det_jax
    from m2det_jax.cli import main
    from m2det_jax.inference.video import is_video_source

    _, _, ckpt = setup
    assert is_video_source(name) and is_video_source("0") and is_video_source("rtsp://h/s")
    assert not is_video_source("a.png")
    rng = np.random.default_rng(3)
    src = str(tmp_path / name)
    w = cv2.VideoWriter(src, cv2.VideoWriter_fourcc(*fourcc), 12.0, (64, 48))
    for _ in range(7):
        w.write(rng.integers(0, 255, (48, 64, 3), np.uint8))
    w.release()
    args = ["detect", "--config", config_path("tiny"), *("--config." + o for o in OVERRIDES),
            "--checkpoint", str(ckpt), "--input", src, "--score_threshold", "0.2",
            "--batch", "2"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    jsonl = (tmp_path / "out" / "detections.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in jsonl]
    assert [r["frame"] for r in lines] == list(range(7))
    assert [r["time"] for r in lines] == pytest.approx([i / 12 for i in range(7)], abs=1e-3)
    cap = cv2.VideoCapture(src)
    first = cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB)
    det = m2det_jax.Detector.from_checkpoint(ckpt, overrides=OVERRIDES, score_threshold=0.2)
    assert lines[0]["detections"] == det(first).to_json()
    out = cv2.VideoCapture(str(tmp_path / "out" / (name.split(".")[0] + ".mp4")))
    assert int(out.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    assert out.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    assert (out.get(cv2.CAP_PROP_FRAME_WIDTH), out.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (64, 48)
    assert main([*args, "--output", str(tmp_path / "short"), "--max_frames", "3"]) == 0
    assert len((tmp_path / "short" / "detections.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit, match="cannot open video source"):
        main([*args, "--input", str(tmp_path / "missing.mp4"), "--output",
              str(tmp_path / "x")])  # fmt: skip (the last --input counts)


def test_a_broken_video_frame_is_skipped_and_counted(setup, tmp_path, capsys):
    """A frame whose JPEG data is wiped inside an MJPG AVI: the frames before and after it
    keep their indices, the broken one is skipped and counted, the video holds the rest."""
    import cv2

    from m2det_jax.cli import main

    _, _, ckpt = setup
    src = tmp_path / "broken.avi"
    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(7):
        w.write(np.full((48, 64, 3), 30 * i, np.uint8))
    w.release()
    data = bytearray(src.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == 7  # one JPEG per frame
    data[starts[3]:starts[3] + 200] = bytes(200)  # frame 3: no JPEG data left
    src.write_bytes(bytes(data))
    args = ["detect", "--config", config_path("tiny"), *("--config." + o for o in OVERRIDES),
            "--checkpoint", str(ckpt), "--input", str(src), "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert "6 frames (1 skipped)" in capsys.readouterr().out
    lines = (tmp_path / "out" / "detections.jsonl").read_text().splitlines()
    assert [json.loads(x)["frame"] for x in lines] == [0, 1, 2, 4, 5, 6]
    out = cv2.VideoCapture(str(tmp_path / "out" / "broken.mp4"))
    assert int(out.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
