"""YOLO-format folders (`data.dataset=yolo_folder`): the dataset YAML, images/ + labels/,
bad lines skipped and counted, rebuilt on edits, evaluated with COCO metrics."""

import numpy as np
import pytest

from m2det_jax import data, load_config
from m2det_jax.data.sources.shapes import encode_png
from m2det_jax.data.sources.yolo_folder import label_file
from tests.helpers import OVERRIDES, config_path, tiny_variables


def _dataset(root, val_labels=True):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / "images" / split / f"{i}.png").write_bytes(
                encode_png(rng.integers(0, 255, (40, 80, 3), np.uint8)))  # fmt: skip
            if split == "val" and not val_labels:
                continue
            lines = ["0 0.5 0.5 0.5 0.5", f"1 0.25 0.25 0.25 {0.1 * (i + 1):.1f}"]
            if split == "train" and i == 0:
                lines += ["7 0.5 0.5 0.1 0.1", "1 0.5 oops 0.1 0.1", "0 0.5 0.5 0 0.2"]
            if split == "train" and i == 3:
                continue  # no label file: an image without objects
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                    "names:\n  0: cat\n  1: dog\n")  # fmt: skip
    return root / "data.yaml"


def _cfg(tmp_path, yaml_path, *more):
    return load_config(config_path("tiny"), [
        "data.dataset=yolo_folder", f"data.yolo_yaml={yaml_path}",
        f"data.data_dir={tmp_path / 'tfds'}", "model.num_classes=3", "data.num_workers=0",
        "data.eval_batch_size=2", "postprocess.score_threshold=0.05", *OVERRIDES, *more])


def test_label_files_sit_beside_the_images():
    assert label_file("/d/images/train/a.jpg") == "/d/labels/train/a.txt"
    assert label_file("/images/d/images/x/b.png") == "/images/d/labels/x/b.txt"


def test_a_yolo_folder_builds_counts_and_evaluates(tmp_path, caplog):
    from m2det_jax.evaluation.driver import evaluate_variables

    yaml_path = _dataset(tmp_path / "ds")
    cfg = _cfg(tmp_path, yaml_path)
    with caplog.at_level("WARNING"):
        builder = data.open_builder(cfg)
    assert "'bad_label_lines': 3" in caplog.text and "0.txt" in caplog.text
    assert "'images_without_labels': 1" in caplog.text
    assert data.class_names(builder) == ["cat", "dog"]
    gt = data.ground_truth(builder, "validation")
    assert len(gt["images"]) == 2
    # On 80 x 40 images "1 0.25 0.25 0.25 0.1" -> x 10, y 8, w 20, h 4 pixels; "... 0.2" ->
    # x 10, y 6, w 20, h 8.
    dog = sorted((a["bbox"] for a in gt["annotations"] if a["category_id"] == 2),
                 key=lambda b: b[3])  # fmt: skip
    np.testing.assert_allclose(dog, [[10, 8, 20, 4], [10, 6, 20, 8]], atol=0.01)
    cat = [a for a in gt["annotations"] if a["category_id"] == 1]
    np.testing.assert_allclose(cat[0]["bbox"], [20, 10, 40, 20], atol=0.6)
    train = data.ground_truth(builder, "train")
    assert len(train["images"]) == 4 and len(train["annotations"]) == 6  # 3 bad lines out
    m = evaluate_variables(cfg, tiny_variables(cfg), builder=builder)
    assert "AP" in m and m["num_images"] == 2
    # Edited labels: a new build.
    (tmp_path / "ds" / "labels" / "val" / "0.txt").write_text("1 0.5 0.5 0.9 0.9\n")
    again = data.open_builder(cfg)
    assert again.builder_config.name != builder.builder_config.name
    assert len(data.ground_truth(again, "validation")["annotations"]) == 3


def test_yolo_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.yolo_yaml: no file"):
        data.open_builder(_cfg(tmp_path, tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("train: images/train\nnames: []\n")
    with pytest.raises(ValueError, match="'names'"):
        data.open_builder(_cfg(tmp_path, tmp_path / "bad.yaml"))
    (tmp_path / "nofolder.yaml").write_text("train: nowhere\nnames: [a, b]\n")
    with pytest.raises(FileNotFoundError, match="'nowhere'"):
        data.open_builder(_cfg(tmp_path, tmp_path / "nofolder.yaml"))
