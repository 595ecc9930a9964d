"""Evaluation pictures on a case with known answers: the drawn mean PR curve's area is the
AP the evaluation reports, the confusion matrix holds the hand-counted cells, the per-class
table the per-class AP, and the worst images are the ones whose objects were not found."""

import csv

import numpy as np
import pytest

from m2det_jax.evaluation import pictures
from m2det_jax.evaluation.coco import coco_evaluate

# Two classes (ids 3 "cat", 8 "dog"), four 100 x 80 images:
#   1: a cat, found as a cat;       2: a dog, found as a cat (confused);
#   3: a cat, missed, and a dog box on empty ground (a false positive);
#   4: a dog, found as a dog, and a cat found as a cat.
GT = {
    "images": [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.png"}
               for i in (1, 2, 3, 4)],
    "categories": [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 30]},
        {"id": 2, "image_id": 2, "category_id": 8, "bbox": [20, 20, 40, 30]},
        {"id": 3, "image_id": 3, "category_id": 3, "bbox": [5, 5, 20, 20]},
        {"id": 4, "image_id": 4, "category_id": 8, "bbox": [50, 10, 40, 40]},
        {"id": 5, "image_id": 4, "category_id": 3, "bbox": [5, 40, 30, 30]},
    ],
}
for a in GT["annotations"]:
    a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)

# [image_id, x, y, w, h, score, category_id]
RESULTS = np.array([
    [1, 10, 10, 30, 30, 0.9, 3],
    [2, 21, 20, 40, 30, 0.8, 3],
    [3, 60, 50, 20, 20, 0.7, 8],
    [4, 50, 11, 40, 40, 0.95, 8],
    [4, 5, 41, 30, 30, 0.6, 3],
    [1, 60, 40, 10, 10, 0.1, 8],  # below the pictures' score threshold: not counted
], np.float64)


def test_pictures_on_a_case_with_known_answers(tmp_path):
    keep = {}
    metrics = coco_evaluate(GT, RESULTS, image_ids=[1, 2, 3, 4], keep=keep)
    read = []

    def images(image_id):
        read.append(image_id)
        return np.full((80, 100, 3), 40 * image_id, np.uint8)

    written = pictures.write_pictures(tmp_path, GT, RESULTS, [1, 2, 3, 4], keep, images,
                                      score_threshold=0.25, worst=2)  # fmt: skip
    for name in ("pr_curves.png", "confusion_matrix.png", "worst_images.png",
                 "per_class.csv", "per_class.md"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0 and name in written
    # Confusion: rows true cat, dog, background; columns predicted cat, dog, background.
    m = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", dtype=int)
    np.testing.assert_array_equal(m, [[2, 0, 1],   # cats: 2 found, 1 missed
                                      [1, 1, 0],   # dogs: 1 taken for a cat, 1 found
                                      [0, 1, 0]])  # a dog box on nothing
    # The drawn mean curves: their area is what the evaluation reports.
    fig = pictures.pr_figure(keep, ["cat", "dog"])
    left, right = ([ln for ln in ax.get_lines() if ln.get_gid() == "mean"][0]
                   for ax in fig.axes)  # fmt: skip
    assert np.mean(left.get_ydata()) == pytest.approx(metrics["AP50"], abs=1e-9)
    assert np.mean(right.get_ydata()) == pytest.approx(metrics["AP"], abs=1e-9)
    assert 0 < metrics["AP50"] < 1
    with open(tmp_path / "per_class.csv") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    for name in ("cat", "dog"):
        assert float(rows[name]["AP"]) == pytest.approx(metrics[f"AP/{name}"], abs=1e-4)
    assert (rows["cat"]["ground_truth"], rows["dog"]["ground_truth"]) == ("3", "2")
    # Worst: images 2 and 3 (nothing right), in id order; 1 and 4 are perfect.
    assert read == [2, 3]
    scores = pictures.image_scores(pictures.agnostic_matches(GT, RESULTS, [1, 2, 3, 4]), 0.25,
                                   {a["id"]: a for a in GT["annotations"]})  # fmt: skip
    assert scores == {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_drawing_survives_an_untrained_networks_boxes():
    """NMS output is not clipped: an untrained network's boxes can be 1e30 pixels or NaN
    (the kill -9 test's final evaluation drew them and failed); they are clipped or left
    out, and an ordinary box is still drawn."""
    from m2det_jax.inference.image_files import draw_detections

    im = np.zeros((40, 50, 3), np.uint8)
    wild = [{"box": [1e30, -1e30, 3e38, 1e31], "class": 1, "label": "a", "score": 0.5},
            {"box": [float("nan"), 0, 5, 5], "class": 1, "label": "b", "score": 0.5},
            {"box": [-1e9, -5, 1e9, 20], "class": 2, "label": "c", "score": None}]
    drawn = np.asarray(draw_detections(im, wild))
    assert drawn.shape == (40, 50, 3) and drawn.any()  # the clipped third box
    assert not np.asarray(draw_detections(im, wild[:2])).any()  # nothing inside: nothing
