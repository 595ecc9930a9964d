"""Training curves (`m2det plot`): what is drawn is what metrics.jsonl holds."""

import json

import numpy as np
import pytest
from PIL import Image

from m2det_jax.cli import main
from m2det_jax.train.curves import curves_figure, plot_curves, read_curves


def _run(tmp_path):
    rows = [{"step": s, "loss": 10.0 / s, "loc_loss": 4.0 / s, "conf_loss": 6.0 / s,
             "lr": 1e-3 * s, "images_per_sec": 20.0 + s} for s in (1, 2, 3, 4)]
    rows.insert(2, {"step": 2, "AP": 0.1, "AP50": 0.3})
    rows.append({"step": 4, "AP": 0.25, "AP50": 0.5})
    rows.append({"step": 3, "loss": 9.0, "lr": 0.003, "images_per_sec": 30.0})  # resumed
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_the_curves_are_the_logged_values(tmp_path):
    curves = read_curves(_run(tmp_path))
    assert curves["loss"] == ([1, 2, 3, 4], [10.0, 5.0, 9.0, 2.5])  # step 3: its last value
    assert curves["AP"] == ([2, 4], [0.1, 0.25]) and "mAP" not in curves
    fig = curves_figure(curves)
    drawn = {line.get_label(): line.get_xydata().tolist()
             for ax in fig.axes for line in ax.lines}  # fmt: skip
    assert drawn["loss"] == [[1, 10.0], [2, 5.0], [3, 9.0], [4, 2.5]]
    assert drawn["AP50"] == [[2, 0.3], [4, 0.5]]
    assert drawn["images_per_sec"][2] == [3, 30.0]
    assert set(drawn) == {"loss", "loc_loss", "conf_loss", "lr", "images_per_sec", "AP", "AP50"}


def test_m2det_plot_writes_a_png(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["plot", str(run)]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(run / "curves.png") == plot_curves(run)
    with Image.open(path) as im:
        assert im.size == (1000, 700)
        assert np.asarray(im.convert("L")).std() > 10  # something is drawn
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(["plot", str(tmp_path / "nothing")])
