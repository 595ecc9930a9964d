"""Training: LR schedule, sharded == single step (8 fake devices), SIGTERM checkpoints
(one process), a clear error on resuming with another config. Multi-host data order,
kill -9, agreed preemption and the NaN guard on the real pipeline: test_train_reliability.py."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from m2det_jax import load_config
from m2det_jax.train.optim import learning_rate_schedule
from tests.helpers import (
    ROOT,
    config_path,
    make_synthetic,
    run_worker,
    worker_command,
    worker_env,
)
from tests.train_worker import real_overrides


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lr_schedule_matches_original():
    cfg = load_config(config_path("m2det320_vgg"))
    epoch_size = 100
    lr = learning_rate_schedule(cfg, epoch_size)

    def original(iteration):  # train.py's adjust_learning_rate, epoch counter 1-based
        epoch = iteration // epoch_size + 1
        if epoch <= 5:
            return 1e-6 + (0.004 - 1e-6) * iteration / (epoch_size * 5)
        for bound, v in zip((90, 110, 130, 150, 160), (0.004, 0.002, 4e-4, 4e-5, 4e-6), strict=False):
            if bound >= epoch:
                return v
        return 4e-6

    for it in (0, 1, 250, 499, 500, 8999, 9000, 10999, 11000, 12999, 13000, 14999, 15000,
               15999):  # fmt: skip
        np.testing.assert_allclose(float(lr(it)), original(it), rtol=1e-6, err_msg=str(it))
    cfg.train.scale_lr_with_batch = True
    cfg.train.batch_size = 128
    np.testing.assert_allclose(float(learning_rate_schedule(cfg, epoch_size)(600)), 0.008)


@pytest.mark.slow
def test_sharded_step_equals_single_device(tmp_path):
    out = tmp_path / "mesh.json"
    run_worker(["mesh", str(out)], worker_env())
    d = json.loads(out.read_text())
    assert d["loss"] <= 1e-5 * abs(d["loss_value"])
    assert d["params"] < 1e-6  # grads and the SGD update agree
    assert d["bn_moved"] > 1e-3  # BatchNorm statistics were updated ...
    assert d["batch_stats"] < 1e-4 * max(d["bn_moved"], 1)  # ... over the global batch


@pytest.mark.slow
def test_sigterm_leaves_restorable_checkpoint(tmp_path, shapes):
    wd = tmp_path / "sig"  # the real grain pipeline of the shapes set
    p = subprocess.Popen(worker_command("train", wd, 1000, "--slow", 0.5, "--data", shapes[0]),
                         env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and not _has_rows(wd):
        time.sleep(0.5)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "DONE" in out and "True" in out  # preempted
    steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    last = max(_losses(wd))
    assert steps and steps[-1] >= last
    # The saved step restores as a training state: the state and the input position of that
    # same step (what a rerun resumes from), and its variables load for the same config.
    import functools

    import jax

    from m2det_jax.checkpoints.training import TrainCheckpoints
    from m2det_jax.checkpoints.variables import load_variables
    from m2det_jax.models import build_model
    from m2det_jax.train.optim import make_optimizer
    from m2det_jax.train.step import TrainState

    cfg = load_config(config_path("tiny"), real_overrides(shapes[0]))
    tx = make_optimizer(cfg, learning_rate_schedule(cfg, 1))
    abstract = jax.eval_shape(functools.partial(TrainState.create, build_model(cfg), tx, cfg),
                              jax.random.key(0))  # fmt: skip
    step, state, data = TrainCheckpoints(wd / "checkpoints", 3).restore_latest(abstract, cfg)
    assert step == steps[-1] and int(state.step) == step
    assert data["position"] == step * data["global_batch"]
    restored = load_variables(wd, cfg)
    jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def _has_rows(wd):
    f = wd / "metrics.jsonl"
    return f.exists() and f.stat().st_size > 0


@pytest.mark.slow
def test_resume_with_another_config_is_a_clear_error(tmp_path):

    from m2det_jax.errors import ConfigMismatchError
    from m2det_jax.train.loop import train_and_evaluate

    wd = tmp_path / "run"
    run_worker(["train", str(wd), "1"], worker_env())
    cfg = load_config(config_path("tiny"), ["model.num_classes=6", "train.num_steps=2"])
    with pytest.raises(ConfigMismatchError, match="model.num_classes: checkpoint 4, config 6"):
        train_and_evaluate(cfg, str(wd), train_iterator_fn=make_synthetic,
                           num_train_examples=64, evaluate_fn=lambda c, v, s: {},
                           progress=False)
    # Same weight shapes, other outputs: an anchors-only or loss-only change is refused too.
    for override, field in (("anchors.variance=(0.1,0.25)", "anchors.variance"),
                            ("loss.neg_pos=2", "loss.neg_pos")):  # fmt: skip
        cfg = load_config(config_path("tiny"), [override, "train.num_steps=2"])
        with pytest.raises(ConfigMismatchError, match=rf"{field}: checkpoint .*, config"):
            train_and_evaluate(cfg, str(wd), train_iterator_fn=make_synthetic,
                               num_train_examples=64, evaluate_fn=lambda c, v, s: {},
                               progress=False)  # fmt: skip
