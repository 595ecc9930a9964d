"""MultiBoxLoss of the original M2Det (docs/original.md §4), vectorised over the batch.

Per image: match priors to ground truth (IoU, best GT per prior, force-match each GT's
best prior, threshold), encode loc targets, then smooth-L1 over positives and
cross-entropy over positives plus hard-mined negatives (neg_pos : 1). Both sums are
divided by N = max(positives in the batch, 1).

Everything is static-shape and jittable: ground truth is padded with a `valid` mask, and
the order-dependent parts of the original's Python loops (force-matching, ranking) are
written as a scatter and a stable sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2det_jax.core import box_ops


def _match_one(
    boxes: jnp.ndarray,
    labels: jnp.ndarray,
    valid: jnp.ndarray,
    priors: jnp.ndarray,
    priors_xyxy: jnp.ndarray,
    overlap_thresh: float,
    variance,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Matches one image's padded ground truth to the priors.

    Args:
      boxes: [G, 4] normalized xyxy (rows where `valid` is False are ignored).
      labels: [G] int, 1..C-1.
      valid: [G] bool.
      priors: [P, 4] (cx, cy, w, h).
      priors_xyxy: [P, 4] `core.box_ops.cxcywh_to_xyxy(priors)`.

    Returns:
      loc_t [P, 4] encoded targets (0 where the prior is not positive) and conf_t [P]
      int32 labels (0 = background).
    """
    num_gt = boxes.shape[0]
    num_priors = priors.shape[0]
    # [G, P], the original's float32 formula. Padded GTs get -1 so they never win a
    # max over GTs (any valid GT has IoU >= 0) and never reach the threshold.
    overlaps = box_ops.iou(boxes, priors_xyxy)
    overlaps = jnp.where(valid[:, None], overlaps, -1.0)
    # Best GT per prior and best prior per GT; argmax returns the first index on ties,
    # as torch's max(dim) does.
    best_truth_overlap = jnp.max(overlaps, axis=0)  # [P]
    best_truth_idx = jnp.argmax(overlaps, axis=0).astype(jnp.int32)  # [P]
    best_prior_idx = jnp.argmax(overlaps, axis=1).astype(jnp.int32)  # [G]
    # Force-match. The original loops over GTs in order writing
    # best_truth_idx[best_prior_idx[j]] = j, so the largest j sharing a prior wins: a
    # scatter-max of the GT index. Padded GTs scatter -1, i.e. nothing.
    gt_ids = jnp.where(valid, jnp.arange(num_gt, dtype=jnp.int32), -1)
    forced = jnp.full((num_priors,), -1, jnp.int32).at[best_prior_idx].max(gt_ids)  # [P]
    is_forced = forced >= 0
    best_truth_idx = jnp.where(is_forced, forced, best_truth_idx)
    best_truth_overlap = jnp.where(is_forced, 2.0, best_truth_overlap)

    conf_t = labels.astype(jnp.int32)[best_truth_idx]
    conf_t = jnp.where(best_truth_overlap < overlap_thresh, 0, conf_t)  # [P]
    pos = conf_t > 0
    matched = boxes[best_truth_idx]  # [P, 4]
    loc_t = box_ops.encode(matched, priors, variance)
    # Non-positive priors may be matched to a padded/degenerate box (log 0 = -inf):
    # zero them so nothing non-finite reaches the loss or its gradient.
    loc_t = jnp.where(pos[:, None], loc_t, 0.0)
    return loc_t, conf_t


def match(
    priors: jnp.ndarray,
    boxes: jnp.ndarray,
    labels: jnp.ndarray,
    valid: jnp.ndarray,
    overlap_thresh: float = 0.5,
    variance=(0.1, 0.2),
    *,
    batch_size: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Batched prior matching as the original's `match` (docs/original.md §4).

    Args:
      priors: [P, 4] (cx, cy, w, h).
      boxes: [B, G, 4] normalized xyxy, padded.
      labels: [B, G] int, 1..C-1.
      valid: [B, G] bool.
      overlap_thresh: priors whose best overlap is below it become background.
      variance: the two encoding variances.
      batch_size: None matches all images at once (vmap; peak memory holds the
        [B, G, P] IoU matrices). k matches k images at a time (`lax.map`), bounding
        that to [k, G, P] (float32, arithmetic: B=16, G=100, P=80,208 priors at 800 is
        16 x 100 x 80,208 x 4 B = about 490 MiB; with k=1, about 31 MiB).

    Returns:
      loc_t [B, P, 4] float32 (zero for non-positive priors) and conf_t [B, P] int32.
    """
    priors = jnp.asarray(priors, jnp.float32)
    priors_xyxy = box_ops.cxcywh_to_xyxy(priors)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    variance = tuple(float(v) for v in variance)
    fn = lambda b, lab, v: _match_one(b, lab, v, priors, priors_xyxy, overlap_thresh, variance)
    xs = (boxes, jnp.asarray(labels), jnp.asarray(valid, bool))
    if batch_size is None:
        return jax.vmap(fn)(*xs)
    return jax.lax.map(lambda x: fn(*x), xs, batch_size=batch_size)


def _smooth_l1(x: jnp.ndarray) -> jnp.ndarray:
    """Smooth L1 with beta 1 (torch's F.smooth_l1_loss, elementwise)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def hard_negatives(mining_loss: jnp.ndarray, num_neg: jnp.ndarray) -> jnp.ndarray:
    """Per row, marks the `num_neg` priors with the largest mining loss.

    The original ranks by `loss.sort(descending=True)` then `idx.sort()` and keeps
    rank < num_neg. Here the ranking is a *stable* descending sort: among equal losses the
    lower prior index ranks first. (torch's default CPU sort is not stable for large
    rows, so the original's order among exact ties is unspecified; for negatives the
    mining loss equals their cross-entropy, so ties never change the loss value, only
    which of the tied priors gets the gradient.)

    Args:
      mining_loss: [B, P] (no gradient needed).
      num_neg: [B] how many to keep per row.

    Returns:
      [B, P] bool.
    """
    num_priors = mining_loss.shape[-1]
    order = jnp.argsort(mining_loss, axis=-1, descending=True, stable=True)  # [B, P]
    ranks = jnp.arange(num_priors, dtype=jnp.int32)
    # Inverse permutation (the original's second sort) as a scatter: rank[order[r]] = r.
    rank = jax.vmap(lambda o: jnp.zeros((num_priors,), jnp.int32).at[o].set(ranks))(order)
    return rank < num_neg[:, None]


def multibox_loss(
    loc: jnp.ndarray,
    logits: jnp.ndarray,
    priors: jnp.ndarray,
    boxes: jnp.ndarray,
    labels: jnp.ndarray,
    valid: jnp.ndarray,
    cfg,
    *,
    match_batch_size: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The original MultiBoxLoss (docs/original.md §4): (loc_loss, conf_loss), each / N.

    Args:
      loc: [B, P, 4] predicted regressions.
      logits: [B, P, C] raw class logits (class 0 = background).
      priors: [P, 4] (cx, cy, w, h), as `prior_boxes(cfg)`.
      boxes: [B, G, 4] normalized [x1, y1, x2, y2], padded.
      labels: [B, G] int, 1..C-1.
      valid: [B, G] bool; padded rows never match anything.
      cfg: uses `cfg.loss.overlap_thresh`, `cfg.loss.neg_pos`, `cfg.anchors.variance`.
      match_batch_size: images matched at a time (None = all; see `match`). Only
        memory and speed change (targets may differ by float rounding of the encode).

    Returns:
      (loc_loss, conf_loss): float32 scalars, smooth-L1 over positives and cross-entropy
      over positives + mined negatives, both divided by max(total positives, 1). An image
      without valid boxes contributes no positives and no negatives.
    """
    loc_loss, conf_loss, num_pos = multibox_loss_sums(
        loc, logits, priors, boxes, labels, valid, cfg, match_batch_size=match_batch_size
    )
    n = jnp.maximum(num_pos, 1).astype(jnp.float32)
    return loc_loss / n, conf_loss / n


def multibox_loss_sums(
    loc: jnp.ndarray,
    logits: jnp.ndarray,
    priors: jnp.ndarray,
    boxes: jnp.ndarray,
    labels: jnp.ndarray,
    valid: jnp.ndarray,
    cfg,
    *,
    match_batch_size: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`multibox_loss` before the division: (loc_sum, conf_sum, num_pos).

    loc_sum and conf_sum are float32 sums over the batch, num_pos the int32 number of
    positive priors in it. `multibox_loss` is (loc_sum, conf_sum) / max(num_pos, 1); sums
    and counts of several microbatches add up to those of their concatenation (matching
    and hard-negative mining are per image), which gradient accumulation relies on.
    """
    loc = loc.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    num_priors = logits.shape[1]
    loc_t, conf_t = match(
        priors,
        boxes,
        labels,
        valid,
        cfg.loss.overlap_thresh,
        cfg.anchors.variance,
        batch_size=match_batch_size,
    )  # [B, P, 4], [B, P]
    pos = conf_t > 0  # [B, P]
    num_pos = jnp.sum(pos, axis=1, dtype=jnp.int32)  # [B]

    loc_loss = jnp.sum(jnp.where(pos[..., None], _smooth_l1(loc - loc_t), 0.0))

    # Per-prior cross-entropy against the matched label (0 for background). For a
    # non-positive prior this is exactly the original's mining loss
    # logsumexp(conf) - conf[0]; the original subtracts one global max inside its
    # logsumexp, we use the per-prior max (same value up to rounding, never underflows).
    # Only [B, P] values are kept: no [B, P, C] log-softmax is materialised.
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, P]
    picked = jnp.take_along_axis(logits, conf_t[..., None], axis=-1)[..., 0]  # [B, P]
    ce = lse - picked  # [B, P]

    mining = jax.lax.stop_gradient(jnp.where(pos, 0.0, ce))
    num_neg = jnp.minimum(cfg.loss.neg_pos * num_pos, num_priors - 1)  # [B]
    neg = hard_negatives(mining, num_neg)
    selected = jax.lax.stop_gradient(pos | neg)  # positives counted once, as (pos+neg).gt(0)
    conf_loss = jnp.sum(jnp.where(selected, ce, 0.0))

    return loc_loss, conf_loss, jnp.sum(num_pos)
