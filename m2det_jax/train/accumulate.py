"""Gradient accumulation for the train step (`train.grad_accum_steps` = k > 1).

The step's (preprocessed) batch is split into k microbatches that a `jax.lax.scan` runs one
after the other, so activation memory is that of B/k images. What is exact and what is not:

* Loss normaliser: the loss is (sum over microbatches of the unnormalised loc + conf sums)
  / max(positives in the WHOLE batch, 1), as the original computes it for the full batch.
  The scan adds up the sums, the positive counts and the gradients of the unnormalised sums;
  dividing once at the end is exact because N does not depend on the parameters (matching
  is discrete), so d(sum / N) = d(sum) / N.
* Split order: microbatch j holds rows j, j + k, j + 2k, ... of the batch (a reshape
  [B/k, k, ...] then a swap to [k, B/k, ...]). Under `jit` the batch axis is sharded over
  the devices in contiguous blocks; this split keeps every microbatch spread evenly over
  all devices (each device splits its own rows), with no data movement between devices.
* BatchNorm: in training mode each microbatch is normalised with its own statistics (B/k
  images, unavoidable without a second pass). Every microbatch starts from the step's
  running statistics and the k updated statistics are AVERAGED: one momentum update per
  step, as without accumulation, with the mean of the microbatch statistics. (Running
  means then equal a full-batch update exactly; running variances are the mean of the
  per-microbatch variances, which leaves out the spread between microbatch means.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from m2det_jax.train.losses import multibox_loss_sums


def check_batch(batch_size: int, k: int, what: str = "per-process batch") -> None:
    """Raises ValueError unless `batch_size` splits into `k` equal microbatches."""
    if k < 1 or batch_size % k:
        raise ValueError(
            f"train.grad_accum_steps={k}: the {what} of {batch_size} images does not split "
            f"into {k} equal microbatches"
        )


def split_microbatches(tree: Any, k: int) -> Any:
    """[B, ...] leaves -> [k, B/k, ...]; microbatch j holds rows j, j + k, j + 2k, ..."""
    leaves = jax.tree.leaves(tree)
    check_batch(leaves[0].shape[0], k, "batch")

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, tree)


def multibox_sums_fn(model, cfg, priors, batch_stats) -> Callable:
    """(params, (images, boxes, labels, valid)) -> (loc_sum + conf_sum, (loc_sum, conf_sum,
    num_pos, new_batch_stats)): the training-mode forward and unnormalised loss."""

    def fn(params, micro):
        images, boxes, labels, valid = micro
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images, True, mutable=["batch_stats"],
        )  # fmt: skip
        loc_s, conf_s, num_pos = multibox_loss_sums(
            out["loc"], out["logits"], priors, boxes, labels, valid, cfg
        )
        return loc_s + conf_s, (loc_s, conf_s, num_pos, updates["batch_stats"])

    return fn


def accumulated_value_and_grad(sums_fn: Callable, params: Any, inputs: Any, k: int):
    """Gradient accumulation over k microbatches of `inputs` (see the module docstring).

    `sums_fn` is `multibox_sums_fn(...)`. Returns what `jax.value_and_grad(loss_fn,
    has_aux=True)` returns for the plain step: ((loss, (loc_loss, conf_loss,
    new_batch_stats)), grads), with loss = loc_loss + conf_loss and everything divided by
    N = max(positives in all of `inputs`, 1).
    """
    micro = split_microbatches(inputs, k)
    grad_fn = jax.grad(sums_fn, has_aux=True)

    def body(carry, mb):
        g_acc, loc_acc, conf_acc, pos_acc = carry
        g, (loc_s, conf_s, num_pos, new_bs) = grad_fn(params, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, loc_acc + loc_s, conf_acc + conf_s, pos_acc + num_pos), new_bs

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero, jnp.zeros((), jnp.int32))
    (g_sum, loc_sum, conf_sum, num_pos), stacked_bs = jax.lax.scan(body, init, micro)
    n = jnp.maximum(num_pos, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), g_sum)
    new_bs = jax.tree.map(lambda s: jnp.mean(s, axis=0).astype(s.dtype), stacked_bs)
    loc_l, conf_l = loc_sum / n, conf_sum / n
    return (loc_l + conf_l, (loc_l, conf_l, new_bs)), grads
