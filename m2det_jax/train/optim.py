"""Optimizer and learning-rate schedule of the original (docs/original.md §6).

SGD, momentum 0.9, weight decay 5e-4 on every parameter (BN and biases too, as the
original); linear warm-up from `warmup_start_lr` to `base_lr` over `warmup_epochs`, then
piecewise-constant learning rates by (1-based) epoch: epoch e uses lr_values[i] for the
first i with lr_epochs[i] >= e.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax


def lr_scale(cfg) -> float:
    """Linear batch-size scaling of every learning rate, when enabled."""
    t = cfg.train
    return t.batch_size / t.reference_batch_size if t.scale_lr_with_batch else 1.0


def learning_rate_schedule(cfg, steps_per_epoch: int):
    """step (0-based iteration) -> learning rate, jittable."""
    t = cfg.train
    scale = lr_scale(cfg)
    warm = t.warmup_epochs * steps_per_epoch
    bounds = jnp.asarray(np.asarray(t.lr_epochs, np.int32))
    values = jnp.asarray(np.asarray(t.lr_values, np.float32) * scale)
    base, start = t.base_lr * scale, t.warmup_start_lr * scale

    def schedule(step):
        step = jnp.asarray(step)
        epoch = step // steps_per_epoch + 1  # the original's counter is 1 in epoch one
        idx = jnp.minimum(jnp.sum(bounds < epoch), len(t.lr_values) - 1)
        warm_lr = start + (base - start) * step / max(warm, 1)
        return jnp.where(step < warm, warm_lr, values[idx]).astype(jnp.float32)

    return schedule


def make_optimizer(cfg, schedule: Callable) -> optax.GradientTransformation:
    """PyTorch-style SGD: g + wd * p, then momentum, then -lr (optional global-norm clip
    first; the original does not clip). `schedule` is `learning_rate_schedule(cfg, ...)`,
    built once by the caller (the train step logs the same schedule)."""
    t = cfg.train
    clip = [optax.clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm > 0 else []
    if t.optimizer == "adamw":  # not the original's; converges faster from scratch
        return optax.chain(*clip, optax.adamw(schedule, weight_decay=t.weight_decay))
    if t.optimizer != "sgd":
        raise ValueError(f"train.optimizer={t.optimizer!r}: expected 'sgd' or 'adamw'")
    return optax.chain(
        *clip,
        optax.add_decayed_weights(t.weight_decay),
        optax.sgd(schedule, momentum=t.momentum),
    )
