"""Prediction programs: network + decode + NMS as one jitted program, plain or with test-time
augmentation. Evaluation, `m2det detect`, export and the speed benchmark all use them.

* `make_predict_fn(cfg, mesh)`: jit(variables, images, image_sizes) -> `detect`'s dict for
  uint8 RGB images already resized to `cfg.model.input_size`; `preprocess` (channel order,
  means, scale) runs inside the program, so only uint8 crosses to the device.
* `make_tta_fn(cfg, sizes, flip, mesh)`: the paper's multi-scale (+ flip) setting (M2Det
  Table 1, "multi-scale"): every pass is decoded to normalized boxes and class
  probabilities, flipped passes are mirrored back (x1' = 1 - x2), all candidates of an image
  are concatenated and suppressed once more by the public `postprocess.nms`. One jitted
  program for the whole batch, sharded like the plain one.

Programs are cached per (config, mesh) for the life of the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from m2det_jax import distributed as shd
from m2det_jax.core import box_ops
from m2det_jax.core.preprocess import preprocess
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.postprocess import decode_and_score, make_detect_fn, make_nms_fn
from m2det_jax.models import build_model
from m2det_jax.models.fold import apply_inference


def config_for_size(cfg: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """A copy of `cfg` with model.input_size = size (priors follow: `prior_boxes(copy)`)."""
    out = cfg.copy_and_resolve_references()
    out.model.input_size = int(size)
    return out


def tta_sizes(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The input sizes of `cfg.tta` (model.input_size alone when only flipping); () when
    test-time augmentation is off."""
    tta = cfg.tta
    if tta is None or not (tuple(tta.sizes) or bool(tta.flip)):
        return ()
    return tuple(int(v) for v in tta.sizes) or (int(cfg.model.input_size),)


def _cached(build: Callable, cfg: ml_collections.ConfigDict, *key) -> Callable:
    """`build(cfg, *key)`, built once per (config contents, key): ConfigDicts are not
    hashable, their JSON is."""
    k = (build.__name__, cfg.to_json_best_effort(sort_keys=True), *key)
    if k not in _CACHE:
        _CACHE[k] = build(cfg, *key)
    return _CACHE[k]


_CACHE: dict[tuple, Callable] = {}


def make_predict_fn(cfg: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Callable:
    """jit((variables, images uint8 [B, S, S, 3] RGB, image_sizes [B, 2]) -> detections).

    `images` may also be float RGB pixels (0..255); `preprocess` is applied inside.
    Detections are `postprocess.detect`'s dict, boxes in pixels of `image_sizes` (height,
    width). Built once per (config, mesh).
    """
    return _cached(_predict_fn, cfg, mesh)


def _predict_fn(cfg, mesh: Mesh | None) -> Callable:
    model = build_model(cfg)
    priors = jnp.asarray(prior_boxes(cfg))
    detect_fn = make_detect_fn(cfg)

    def predict(variables, images, image_sizes):
        out = apply_inference(model, variables, preprocess(images, cfg))
        return detect_fn(out["loc"], out["logits"], priors, image_sizes)

    if mesh is None:
        return jax.jit(predict)
    batch = shd.batch_sharding(mesh)
    return jax.jit(predict, in_shardings=(shd.replicated(mesh), batch, batch))


def passes_at(cfg_s: ml_collections.ConfigDict, flip: bool) -> Callable:
    """(variables, x uint8 [B, S, S, 3] RGB) -> [(boxes [B, P, 4] normalized, scores [B, P,
    C]), ...]: the plain pass and, with `flip`, the flipped one mirrored back (one forward
    of 2B)."""
    model = build_model(cfg_s)
    priors = jnp.asarray(prior_boxes(cfg_s))

    def passes(variables, x):
        b = x.shape[0]
        x = preprocess(x, cfg_s)
        if flip:
            x = jnp.concatenate([x, x[:, :, ::-1]])
        out = apply_inference(model, variables, x)
        boxes, scores = decode_and_score(out["loc"], out["logits"], priors, cfg_s)
        result = [(boxes[:b], scores[:b])]
        if flip:
            result.append((box_ops.hflip_xyxy(boxes[b:]), scores[b:]))
        return result

    return passes


def make_tta_fn(
    cfg: ml_collections.ConfigDict,
    sizes: Sequence[int] | None = None,
    flip: bool | None = None,
    mesh: Mesh | None = None,
) -> Callable:
    """jit((variables, images, image_sizes [B, 2]) -> detections) with test-time augmentation.

    `images` is a tuple with one uint8 RGB image batch [B, S_i, S_i, 3] per size of `sizes`
    (default `tta_sizes(cfg)`), each resized from the original image. `flip` (default cfg.tta.flip)
    adds mirrored passes. The output has the same K as a plain `detect` for `cfg`.
    """
    sizes = tuple(int(v) for v in (sizes or tta_sizes(cfg) or (cfg.model.input_size,)))
    flip = bool(cfg.tta.flip if flip is None else flip)
    return _cached(_tta_fn, cfg, sizes, flip, mesh)


def _tta_fn(cfg, sizes: tuple[int, ...], flip: bool, mesh: Mesh | None) -> Callable:
    pass_fns = [passes_at(config_for_size(cfg, s), flip) for s in sizes]
    nms_fn = make_nms_fn(cfg)

    def predict(variables, images, image_sizes):
        passes = [p for fn, x in zip(pass_fns, images, strict=True) for p in fn(variables, x)]
        boxes = jnp.concatenate([p[0] for p in passes], axis=1)  # [B, sum P, 4]
        scores = jnp.concatenate([p[1] for p in passes], axis=1)  # [B, sum P, C]
        return nms_fn(boxes, scores, image_sizes)

    if mesh is None:
        return jax.jit(predict)
    batch = shd.batch_sharding(mesh)
    return jax.jit(predict, in_shardings=(shd.replicated(mesh), (batch,) * len(sizes), batch))






