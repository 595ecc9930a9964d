"""`m2det browse`: batches as the network gets them and the data report, on the real
shapes pipeline; priors matched per object by the loss's own rule."""

import json

import numpy as np

from m2det_jax.train.browse import object_matches
from tests.helpers import config_path
from tests.train_worker import real_overrides


def test_object_matches_by_hand():
    """Two objects, four priors: prior 0 and 1 overlap object 0 (IoU 1 and 0.5), prior 2
    overlaps object 1 a little (IoU 0.25), prior 3 nothing: at 0.5 object 0 gets 2
    priors, object 1 only its forced best prior (reached False)."""
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]]], np.float32)
    valid = np.array([[True, True, False]])
    priors = np.array([[0.25, 0.25, 0.5, 0.5],  # = object 0
                       [0.25, 0.375, 0.5, 0.25],  # half of object 0
                       [0.875, 0.875, 0.25, 0.25],  # a quarter of object 1
                       [0.1, 0.9, 0.05, 0.05]], np.float32)  # fmt: skip
    pos, reached = object_matches(boxes, valid, priors, 0.5)
    assert pos.tolist() == [2, 1] and reached.tolist() == [True, False]


def test_browse_cli_writes_batches_and_a_report(shapes, tmp_path, capsys):
    from m2det_jax.cli import main

    args = ["browse", "--config", config_path("tiny"),
            *(f"--config.{o}" for o in real_overrides(shapes[0])),
            "--config.train.batch_size=4"]  # fmt: skip
    assert main([*args, "--workdir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "a" / "browse" / "report.json").read_text())
    assert out.splitlines()[0] == r["verdict"]
    for name in ("batch_0.png", "batch_1.png", "box_sizes.png", "report.md"):
        assert (tmp_path / "a" / "browse" / name).stat().st_size > 0
    assert r["images"] == 16 and r["objects"] == sum(r["class_counts"].values()) > 16
    # The per-object counts add up to the positives the loss's matcher finds.
    p = r["positives_per_object"]
    assert p["total"] == p["total_by_the_loss"] > 0
    # A matching threshold no prior reaches: the verdict says so; device augmentation drawn.
    assert main([*args, "--workdir", str(tmp_path / "b"), "--config.loss.overlap_thresh=0.95",
                 "--config.data.augment_on_device=true", "--batches", "1"]) == 0
    r = json.loads((tmp_path / "b" / "browse" / "report.json").read_text())
    assert r["verdict"].startswith("anchors cover the data poorly")
    assert r["objects_no_prior_reaches"] > 0.5
    assert (tmp_path / "b" / "browse" / "batch_0_device.png").stat().st_size > 0
