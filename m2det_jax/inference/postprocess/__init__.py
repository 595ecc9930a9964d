"""Test-time post-processing: decode, per-class (soft-)NMS, per-image cap.

Two entry points, both one jitted XLA computation for a whole batch with fixed shapes
(they work under an outer jit and with a batch-sharded input):

* `detect(loc, logits, priors, cfg, image_sizes=None)`: the original's `Detect` +
  `nms_process` on the network's output;
* `nms(boxes, scores, cfg, image_sizes=None)`: the same NMS on boxes that are already
  decoded (normalized xyxy) with class probabilities, e.g. the merged candidates of
  several test-time-augmentation passes. `nms(*decode_and_score(loc, logits, priors,
  cfg), cfg, image_sizes)` gives `detect(loc, logits, priors, cfg, image_sizes)`'s rows
  (up to the last-bit rounding described at the end).

What they compute:

1. scores = softmax(logits) over classes (`nms`: the given probabilities); boxes =
   decode(loc, priors, variance) (`nms`: the given boxes), times [w, h, w, h] of
   `image_sizes` when given (pixels of the original image, as the original; normalized
   otherwise). Boxes are **not** clipped.
2. Per image and class c = 1..C-1 (batched): the candidates are the priors whose score is
   strictly greater than `score_threshold` (float32 compare). At most `candidates_per_class`
   of them are kept (the highest scores; on equal scores the lower prior index), and they
   are fed to NMS **in prior order**, as the original does. How many were dropped by this
   cap is returned as `num_dropped`, so truncation is never silent; with
   `num_dropped == 0` the algorithm is exactly the original's.
3. NMS (`method`), all float32, IoU with `pixel_offset` (1 = the original's +1 pixel):
   * "soft_linear" / "soft_gaussian": the original C loop (cpu_soft_nms), emulated step
     by step in the C loop's current array order (swaps and swap-with-last removals), so
     ties among equal scores resolve exactly as in the original. Rows come out in
     selection order with decayed scores.
   * "hard": greedy NMS (the original's gpu_nms): highest score first, suppress IoU >
     iou_threshold; rows in descending score order with the original scores. Among
     exactly equal scores the later prior comes first, as the original's
     `argsort()[::-1]` orders them.
   Only the first `keep_per_class` rows of a class are kept (the original's `keep[:50]`);
   rows never change after they are selected, so the loops stop after `keep_per_class`
   selections, which bounds the work to keep_per_class x candidates_per_class per class.
4. `max_per_image > 0` (0 = no cap, the original's setting): if the image has more rows
   than that, the threshold is the max_per_image-th largest score of the image and every
   class keeps its rows with score >= threshold (the original's rule).

Two run-time choices beyond the original (`postprocess.agnostic`):
`postprocess.class_agnostic` runs one NMS per image over every prior's best class instead
of one per class (K = max_per_image, or keep_per_class when that is 0; rows in selection
order), and `postprocess.classes` (ids) keeps the other classes out of the NMS entirely.

Output layout (fixed K; padding rows have valid False, boxes 0, scores 0):
* `max_per_image == 0`: K = (C-1) * keep_per_class and row (c-1) * keep_per_class + j is
  the j-th selection of class c (class-major blocks, selection order inside a block).
* `max_per_image > 0`: K = min(max_per_image, (C-1) * keep_per_class); the kept rows are
  packed to the front in the same class-major / selection order. The original's `>=`
  rule can keep more than max_per_image rows only when several rows score exactly the
  threshold (float32 tie); the tied rows that do not fit are cut (the last ones in
  class-major order) and counted in `num_tie_dropped`. Rows scoring above the threshold
  are never cut.
Padding rows carry a class in 1..C-1 too (their block's class without the cap, 1 with
it), so lookups by class never go out of range; always mask with `valid`.

Modules, upstream first (each imports only the ones above it):
  settings   `PostprocessSettings` (static, hashable) and `standard_postprocess`;
  arrays     array primitives in the form XLA:CPU runs fastest;
  scoring    decode + softmax, and the scorers: boxes / scores of all or a few priors,
             of (loc, logits, priors) or of (boxes, probabilities);
  loops      the NMS loops: the C-order soft-NMS loop and greedy hard NMS;
  plain      the plain implementation, the specification: every class over every
             prior, then the per-image cap and the output layout;
  untied     speed only: a soft-NMS loop that never moves entries (C-order only on ties);
  tasks      speed only: the per-class work for a subset of classes, packed sort key;
  layouts    speed only: the pre-filter and the cheaper exact layouts, one picked per
             batch with `lax.switch`;
  agnostic   class-agnostic NMS and the class filter.
The fast path (the default) gives the plain implementation's output; run the plain one
alone with `PostprocessSettings(..., fast=False)` (accepted wherever a config is).

Float32 exactness: XLA:CPU contracts `a * b + c` into fused multiply-adds, which the
original's C float code does not; the IoU guards its products against contraction, and
`core.box_ops.decode` and `core.box_ops.scale_xyxy` do too, so IoU and decayed scores are
bit-identical to the C loop for identical input boxes. Between programs, two things can
differ in the last bit (an ulp or two, within 1e-6 of the original's scores):
* the sparse layouts of `detect` soft-max only the gathered rows of the priors that may
  hold a candidate, and XLA may sum a [B, U, C] array's classes in another order than a
  [B, P, C] array's (all priors: `decode_and_score`, the plain path, the all-priors
  layouts);
* with more than one image, XLA rewrites `core.box_ops.decode`'s (loc * variance) * size as
  loc * (variance * size) when the priors [P, 4] are broadcast over the batch (all
  priors), but not when they are gathered per image (sparse layouts), so a box can
  differ by an ulp between those programs.
Two candidates whose scores are equal in exact arithmetic but rounded apart may then be
selected in the other order, as they may be between the original and any float32 port.
`nms` gathers boxes and probabilities as they are, so its fast and plain paths agree bit
for bit; `detect`'s agree bit for bit whenever the layout that runs covers all priors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2det_jax.inference.postprocess import agnostic, layouts, plain, scoring
from m2det_jax.inference.postprocess.settings import PostprocessSettings, standard_postprocess

__all__ = [
    "PostprocessSettings",
    "decode_and_score",
    "detect",
    "layout_index",
    "make_detect_fn",
    "make_nms_fn",
    "nms",
    "standard_postprocess",
]

Settings = ml_collections.ConfigDict | PostprocessSettings


def detect(
    loc: jnp.ndarray,
    logits: jnp.ndarray,
    priors: jnp.ndarray | np.ndarray,
    cfg: Settings,
    image_sizes: jnp.ndarray | np.ndarray | None = None,
) -> dict[str, jnp.ndarray]:
    """Decoded, NMS-ed detections of a batch (the original's Detect + nms_process).

    Args:
      loc: [B, P, 4] box regressions (the original's encoding and prior order).
      logits: [B, P, C] raw class logits (softmax over C is applied here; class 0 is
        background).
      priors: [P, 4] (cx, cy, w, h) normalized, e.g. `prior_boxes(cfg)`.
      cfg: config; uses `cfg.postprocess.*` and `cfg.anchors.variance` (or a
        `PostprocessSettings`).
      image_sizes: [B, 2] (height, width) of the original images; boxes are then in their
        pixels (and NMS runs there, as the original). None: normalized boxes.

    Returns:
      dict with (K fixed, see the module docstring):
        "boxes" [B, K, 4] float32 x1, y1, x2, y2 (not clipped);
        "scores" [B, K] float32 (decayed scores after soft-NMS);
        "classes" [B, K] int32 in 1..C-1 (also on padding rows);
        "valid" [B, K] bool; rows of one class appear in selection order;
        "num_dropped" [B, C] int32, candidates above score_threshold dropped by
          candidates_per_class, per class (column 0 is always 0);
        "num_tie_dropped" [B] int32, rows with a score exactly at the max_per_image
          threshold that the original would keep but that did not fit in K.
    """
    return make_detect_fn(cfg)(loc, logits, priors, image_sizes)


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    cfg: Settings,
    image_sizes: jnp.ndarray | np.ndarray | None = None,
) -> dict[str, jnp.ndarray]:
    """`detect`'s per-class NMS and per-image cap on decoded boxes.

    Args:
      boxes: [B, P, 4] decoded boxes, normalized xyxy (not clipped).
      scores: [B, P, C] class probabilities (softmax rows; class 0 is background).
      cfg: config (`cfg.postprocess.*`) or a `PostprocessSettings`.
      image_sizes: [B, 2] (height, width): boxes are scaled to those pixels (exactly as
        `detect` scales them) before NMS. None: NMS on the normalized boxes.

    Returns:
      `detect`'s dict: the same K, thresholds, method and caps.
    """
    return make_nms_fn(cfg)(boxes, scores, image_sizes)


def make_detect_fn(cfg: Settings) -> Callable[..., dict]:
    """The jitted batch detector for `cfg`: fn(loc, logits, priors, image_sizes=None).

    Built once per distinct post-processing setting (cached), so calling `detect` in a loop
    compiles once per input shape.
    """
    return _jitted(PostprocessSettings.of(cfg), "detect")


def make_nms_fn(cfg: Settings) -> Callable[..., dict]:
    """The jitted batch NMS for `cfg`: fn(boxes, scores, image_sizes=None) (cached)."""
    return _jitted(PostprocessSettings.of(cfg), "nms")


def decode_and_score(
    loc: jnp.ndarray,
    logits: jnp.ndarray,
    priors: jnp.ndarray,
    cfg: ml_collections.ConfigDict,
    image_sizes: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The original's `Detect` for a batch: (boxes [B,P,4] xyxy, scores [B,P,C] softmax).

    Boxes are in pixels of `image_sizes` ([B, 2] height, width) when given, else
    normalized; not clipped. This is exactly what `detect` feeds to NMS.
    """
    variance = tuple(float(v) for v in cfg.anchors.variance)
    return scoring.jitted_decode_and_score(variance)(loc, logits, priors, image_sizes)


def layout_index(logits, cfg_or_settings: Settings) -> int:
    """Which of `layouts.static_layouts` `detect` runs for this batch of logits
    ([B, P, C]): its index. For tests and benchmarks (not jitted)."""
    s = PostprocessSettings.of(cfg_or_settings)
    logits = jnp.asarray(logits, jnp.float32)
    scorer = scoring.LogitScorer(None, logits, None, None, s.variance)
    return layouts.layout_index(scorer, s)


@functools.lru_cache(maxsize=64)
def _jitted(s: PostprocessSettings, entry: str):
    fn = _detect_impl if entry == "detect" else _nms_impl
    return jax.jit(functools.partial(fn, s=s))


def _detect_impl(loc, logits, priors, image_sizes=None, *, s: PostprocessSettings):
    scorer = scoring.LogitScorer(loc, logits.astype(jnp.float32), priors, image_sizes,
                                 s.variance)  # fmt: skip
    return _postprocess(scorer, s)


def _nms_impl(boxes, scores, image_sizes=None, *, s: PostprocessSettings):
    b, p, c = scores.shape
    if boxes.shape != (b, p, 4):
        raise ValueError(f"nms: boxes {boxes.shape} must be [B, P, 4] for scores {scores.shape}")
    if image_sizes is not None and jnp.shape(image_sizes) != (b, 2):
        raise ValueError(f"nms: image_sizes {jnp.shape(image_sizes)} must be [B, 2] = [{b}, 2]")
    scorer = scoring.ProbabilityScorer(boxes.astype(jnp.float32), scores.astype(jnp.float32),
                                       image_sizes)  # fmt: skip
    return _postprocess(scorer, s)


def _postprocess(scorer, s: PostprocessSettings) -> dict:
    if s.classes:
        if max(s.classes) >= scorer.num_classes:
            raise ValueError(f"postprocess.classes={s.classes}: class ids are 1.."
                             f"{scorer.num_classes - 1} for {scorer.num_classes} classes")
        scorer = agnostic.ClassFilter(scorer, s.classes)
    if s.class_agnostic:
        return agnostic.class_rows(scorer, s)
    rows = (layouts.class_rows if s.fast else plain.class_rows)(scorer, s)
    return plain.finish(*rows, s)
