"""Mixed precision and the profiler switch: bf16 compute with float32 master weights
trains like float32 from the same init; `train.profile_steps` writes a trace."""

import glob
import os

import jax
import numpy as np

from m2det_jax import load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import build_model
from m2det_jax.train.loop import train_and_evaluate
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.step import TrainState, make_train_step
from tests.helpers import OVERRIDES, SyntheticIterator, config_path, make_synthetic


def _losses(dtype: str, steps: int = 6) -> tuple[list[float], TrainState]:
    cfg = load_config(config_path("tiny"), [*OVERRIDES, f"model.dtype={dtype}",
                                            "train.warmup_epochs=0",
                                            "train.lr_values=(0.01,0.01,0.01,0.01,0.01)"])  # fmt: skip
    model = build_model(cfg)
    schedule = learning_rate_schedule(cfg, 100)
    tx = make_optimizer(cfg, schedule)
    state = jax.jit(lambda r: TrainState.create(model, tx, cfg, r))(jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)))
    data = SyntheticIterator(cfg, 8)
    out = []
    for _ in range(steps):
        state, m = step(state, next(data))
        out.append(float(m["loss"]))
    return out, state


def test_bf16_trains_like_float32_from_the_same_init():
    f32, s32 = _losses("float32")
    bf16, s16 = _losses("bfloat16")
    # master weights, optimizer state and BatchNorm statistics stay float32
    for leaf in jax.tree.leaves((s16.params, s16.opt_state, s16.batch_stats)):
        assert leaf.dtype != jax.numpy.bfloat16
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 per op). Measured on the tiny
    # config: 0.34 % apart at the shared init, at most 3.8 % over 6 steps of lr 0.01.
    np.testing.assert_allclose(bf16[0], f32[0], rtol=0.01)
    np.testing.assert_allclose(bf16, f32, rtol=0.08)
    assert f32[-1] < f32[0] and bf16[-1] < bf16[0]  # both learn


def test_profile_steps_write_a_trace(tmp_path):
    cfg = load_config(config_path("tiny"), [*OVERRIDES, "train.num_steps=3",
                                            "train.eval_every=-1", "train.profile_steps=(1,3)"])  # fmt: skip
    out = train_and_evaluate(cfg, str(tmp_path), train_iterator_fn=make_synthetic,
                             num_train_examples=64, evaluate_fn=lambda c, v, s: {},
                             progress=False)  # fmt: skip
    assert out["step"] == 3
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
