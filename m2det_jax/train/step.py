"""The train step: `TrainState` and `make_train_step`, pure and jit-able (the loop that
drives them is `m2det_jax.train`).

Non-finite guard, on the device and every step: a step whose loss or gradient norm is
NaN/inf does not touch the state. By default the state then stays frozen at the last
finite step and `nonfinite_step` records the first bad step (the loop reads it at its
log, checkpoint and evaluation syncs, so nothing non-finite is ever saved); with
`train.skip_nonfinite_steps` the step counter moves on and `skipped_steps` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m2det_jax.checkpoints.variables import merge_variables
from m2det_jax.core.preprocess import preprocess
from m2det_jax.data import augment_device, augment_host
from m2det_jax.train import accumulate
from m2det_jax.train.losses import multibox_loss


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole in every checkpoint."""

    step: jax.Array  # int32 scalar: steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite_step: jax.Array = None  # int32: first step with a NaN/inf loss or gradient, -1
    skipped_steps: jax.Array = None  # int32: updates skipped (train.skip_nonfinite_steps)
    ema: Any = None  # {"params", "batch_stats"} averaged (train.ema_decay > 0), else None

    @classmethod
    def create(cls, model, tx, cfg, rng, init_variables=None) -> TrainState:
        """Fresh state; `init_variables` (e.g. a converted checkpoint) replace the init."""
        s = cfg.model.input_size
        variables = model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32), train=False)
        if init_variables is not None:
            variables = merge_variables(variables, init_variables)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        ema = None
        if cfg.train.ema_decay > 0:  # starts at the initial weights
            ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   opt_state=tx.init(params), nonfinite_step=jnp.full((), -1, jnp.int32),
                   skipped_steps=jnp.zeros((), jnp.int32), ema=ema)  # fmt: skip

    @property
    def variables(self) -> dict[str, Any]:
        """The trained weights (what the next step starts from)."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict[str, Any]:
        """What evaluation, detect and export use: the EMA weights when on, else `variables`."""
        return self.ema if self.ema is not None else self.variables


def device_augment(cfg, batch: dict[str, jax.Array], step: jax.Array):
    """(uint8 image, boxes, labels, valid) of a batch: with `data.augment_on_device` after
    the device augmentation (`data.augment_device`, a key per step), else as given."""
    valid = batch["valid"] & batch["mask"][:, None]
    image, boxes, labels = batch["image"], batch["boxes"], batch["labels"]
    if cfg.data.augment_on_device:
        pp = cfg.preprocess
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1 << 20)  # not init's key
        out = augment_device.augment_batch(
            jax.random.fold_in(key, step), image, batch["canvas_sizes"], boxes, labels, valid,
            size=int(cfg.model.input_size), expand_prob=float(cfg.data.expand_prob),
            fill_rgb=augment_host.fill_rgb_from(pp.channel_order, pp.pixel_means))  # fmt: skip
        image, boxes, labels, valid = out["image"], out["boxes"], out["labels"], out["valid"]
    return image, boxes, labels, valid


def device_inputs(cfg, batch: dict[str, jax.Array], step: jax.Array):
    """(network input, boxes, labels, valid) of a uint8 batch, on the device:
    `device_augment`, then, always, `preprocess` (channel order, means, scale)."""
    image, boxes, labels, valid = device_augment(cfg, batch, step)
    return preprocess(image, cfg), boxes, labels, valid


def make_train_step(model, tx, schedule: Callable, cfg, priors: np.ndarray):
    """(state, batch) -> (state, metrics). BatchNorm statistics and the loss normaliser
    come from the global batch under `jit` (the batch axis is sharded, not split).
    The batch carries uint8 images (`device_inputs` makes the network input).
    `schedule` is the optimizer's learning-rate schedule (logged as `lr`).
    `train.grad_accum_steps` k > 1: k microbatches (rows j, j+k, ...) in a scan, the
    normaliser still the whole batch's positives, BN statistics per microbatch and
    running statistics averaged (`m2det_jax.accumulate`); k = 1 is the plain step.
    A non-finite loss or gradient leaves the state as it was (module docstring)."""
    priors = jnp.asarray(priors)
    k = int(cfg.train.grad_accum_steps)
    skip = bool(cfg.train.skip_nonfinite_steps)
    accumulate.check_batch(cfg.train.batch_size // jax.process_count(), k)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        if state.nonfinite_step is None:  # a state made without `create`
            state = state.replace(nonfinite_step=jnp.full((), -1, jnp.int32),
                                  skipped_steps=jnp.zeros((), jnp.int32))  # fmt: skip
        images, boxes, labels, valid = device_inputs(cfg, batch, state.step)

        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images, train=True, mutable=["batch_stats"],
            )  # fmt: skip
            loc_l, conf_l = multibox_loss(
                out["loc"], out["logits"], priors, boxes, labels, valid, cfg
            )
            return loc_l + conf_l, (loc_l, conf_l, updates["batch_stats"])

        if k == 1:
            value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        else:
            sums_fn = accumulate.multibox_sums_fn(model, cfg, priors, state.batch_stats)
            value_and_grad = accumulate.accumulated_value_and_grad(
                sums_fn, state.params, (images, boxes, labels, valid), k)  # fmt: skip
        (loss, (loc_l, conf_l, new_bs)), grads = value_and_grad
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        metrics = {"loss": loss, "loc_loss": loc_l, "conf_loss": conf_l,
                   "lr": schedule(state.step), "grad_norm": grad_norm}  # fmt: skip
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                                  opt_state=opt_state)  # fmt: skip
        if state.ema is not None:
            new_state = new_state.replace(ema=ema_update(state.ema, new_state.variables,
                                                         state.step, cfg.train.ema_decay))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip:  # the step counts, its update does not
            kept = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
            new_state = _select(finite, new_state, kept)
        else:  # frozen from the first bad step on; the loop stops at its next sync
            first = jnp.where(finite, -1, state.step + 1)
            new_state = _select(finite & (state.nonfinite_step < 0), new_state, state)
            new_state = new_state.replace(nonfinite_step=jnp.where(
                state.nonfinite_step >= 0, state.nonfinite_step, first))  # fmt: skip
        metrics["nonfinite_step"] = new_state.nonfinite_step
        metrics["skipped_steps"] = new_state.skipped_steps
        return new_state, metrics

    return step_fn


def ema_update(ema, variables, updates: jax.Array, decay: float):
    """One EMA update: ema * d + variables * (1 - d), d = min(decay, (1 + n) / (10 + n))
    after n earlier updates (the usual warm-up, so early weights fade fast)."""
    n = updates.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, x: (e * d + x.astype(e.dtype) * (1.0 - d)).astype(e.dtype),
                        ema, variables)  # fmt: skip


def total_steps(cfg, steps_per_epoch: int) -> int:
    t = cfg.train
    return t.num_steps if t.num_steps > 0 else t.num_epochs * steps_per_epoch




def _select(pred: jax.Array, a: TrainState, b: TrainState) -> TrainState:
    """`a` where `pred`, else `b`, leaf by leaf (one select per array, fused by XLA)."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
