"""EMA weights (`train.ema_decay`), the best checkpoint (`train.best_metric`) and early
stopping (`train.early_stop_patience`) on the real shapes pipeline, through resume."""

import json
import shutil

import jax
import numpy as np
import pytest

from m2det_jax import load_config
from m2det_jax.checkpoints.variables import load_variables, read_meta
from m2det_jax.train.step import ema_update
from tests.helpers import config_path
from tests.train_worker import real_overrides

# A scripted metric per evaluated step (the metric is this test's input): best at 2,
# then 2 evaluations without a better one.
SCRIPT = {1: 0.10, 2: 0.30, 3: 0.30, 4: 0.25, 5: 0.90, 6: 0.95}


def _cfg(data_dir, *extra):
    return load_config(config_path("tiny"), real_overrides(data_dir) + [
        "train.num_steps=6", "train.log_every=1", "train.checkpoint_every=2",
        "train.keep_checkpoints=10", *extra])  # fmt: skip


def _train(cfg, workdir, seen=None):
    from m2det_jax.train.loop import train_and_evaluate

    def evaluate(cfg, variables, step):
        if seen is not None:
            seen.append((step, jax.tree.map(np.asarray, variables)))
        return {"AP": SCRIPT[step], "AP50": 0.5}

    return train_and_evaluate(cfg, str(workdir), evaluate_fn=evaluate, progress=False)


def test_ema_update_formula():
    ema = {"w": np.full(3, 2.0, np.float32)}
    new = {"w": np.full(3, 4.0, np.float32)}
    d0 = min(0.99, 1 / 10)  # the warm-up: the first update keeps 10 % of the old average
    np.testing.assert_allclose(ema_update(ema, new, np.int32(0), 0.99)["w"], 2 * d0 + 4 * (1 - d0))
    np.testing.assert_allclose(ema_update(ema, new, np.int32(10**6), 0.99)["w"], 2 * 0.99 + 0.04)


def test_ema_resumes_to_the_same_average_and_is_what_evaluation_sees(shapes, tmp_path):
    """6 steps with EMA, evaluated every 2: evaluation gets the EMA weights (not the
    trained ones); a run stopped after its step-4 checkpoint resumes to the same EMA bit for
    bit; the workdir's weights (`m2det eval/detect/export --checkpoint WORKDIR`) are the
    EMA; a checkpoint without EMA does not resume with it (a named config field)."""
    from m2det_jax.errors import ConfigMismatchError

    cfg = _cfg(shapes[0], "train.ema_decay=0.9", "train.eval_every=2")
    seen = []
    whole = _train(cfg, tmp_path / "whole", seen)
    state = whole["state"]
    ema = jax.tree.map(np.asarray, state.ema)
    trained = jax.tree.map(np.asarray, state.variables)
    assert [s for s, _ in seen] == [2, 4, 6]
    jax.tree.map(np.testing.assert_array_equal, seen[-1][1], ema)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ema),
                                                          jax.tree.leaves(trained), strict=True))
    assert diff > 0  # the average is not the last weights
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(
        np.asarray, load_variables(tmp_path / "whole", cfg)), ema)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    again = _train(cfg, resumed)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again["state"].ema), ema)
    plain = _cfg(shapes[0], "train.eval_every=2")
    with pytest.raises(ConfigMismatchError, match="train.ema_decay"):
        _train(plain, resumed)


def test_best_checkpoint_and_early_stopping_survive_resume(shapes, tmp_path):
    """Evaluated every step with the scripted AP: the best (step 2) is kept in
    WORKDIR/best, the run stops after 2 evaluations without a better AP (step 4) and says
    so; rerun, it stops at once; resumed from its step-2 checkpoint it redoes evaluations 3
    and 4 and takes the same decision with the same history."""
    from m2det_jax.cli import main

    cfg = _cfg(shapes[0], "train.eval_every=1", "train.best_metric=AP",
               "train.early_stop_patience=2")
    seen = []
    wd = tmp_path / "run"
    r = _train(cfg, wd, seen)
    assert r["early_stopped"] and r["step"] == 4 and r["best"] == (2, 0.30)
    assert [s for s, _ in seen] == [1, 2, 3, 4]  # no final evaluation after stopping
    best = json.loads((wd / "best.json").read_text())
    assert best["best_step"] == 2 and best["evaluations_since_best"] == 2
    assert best["history"] == [[1, 0.1], [2, 0.3], [3, 0.3], [4, 0.25]]
    kept = jax.tree.map(np.asarray, load_variables(wd / "best", cfg))
    jax.tree.map(np.testing.assert_array_equal, kept, seen[1][1])  # step 2's weights
    assert "step 2" in read_meta(wd / "best")["source"]
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    # Rerun: already stopped.
    again = _train(cfg, wd)
    assert again["early_stopped"] and again["step"] == 4
    # Resumed from step 2: the same decision, the same history.
    mid = tmp_path / "mid"
    shutil.copytree(wd, mid)
    for s in (3, 4):
        shutil.rmtree(mid / "checkpoints" / str(s), ignore_errors=True)
    seen2 = []
    r2 = _train(cfg, mid, seen2)
    assert [s for s, _ in seen2] == [3, 4] and r2["early_stopped"] and r2["step"] == 4
    assert json.loads((mid / "best.json").read_text()) == best
    # --best on eval / detect / export: WORKDIR/best with the workdir's config.
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(wd), "--best", "--output", str(out),
                 "--serving", "none"]) == 0  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, load_variables(out, cfg)), kept)
    with pytest.raises(SystemExit, match="--best: no .*best"):
        main(["export", "--checkpoint", str(tmp_path), "--best", "--output", str(out)])


def test_settings_are_checked_before_training(shapes, tmp_path):
    from m2det_jax.train.loop import train_and_evaluate

    with pytest.raises(ValueError, match="early_stop_patience=2 needs train.best_metric"):
        _cfg(shapes[0], "train.early_stop_patience=2", "train.eval_every=1")
    with pytest.raises(ValueError, match="needs periodic evaluations"):
        _cfg(shapes[0], "train.early_stop_patience=2", "train.best_metric=AP")
    with pytest.raises(ValueError, match=r"ema_decay=1.0: a decay in \[0, 1\)"):
        _cfg(shapes[0], "train.ema_decay=1.0")
    cfg = _cfg(shapes[0], "train.best_metric=mAP")  # a COCO-scored set: no mAP
    with pytest.raises(ValueError, match="best_metric='mAP': the COCO metrics are AP, AP50"):
        train_and_evaluate(cfg, str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "x" / "checkpoints").exists()
