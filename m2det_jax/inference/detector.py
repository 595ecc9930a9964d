"""`make_detector`: uint8 RGB images of any size -> numpy detections in their own pixels;
`prepare_images` / `pad_batch`: the host side of it (resize, fixed-size batches).

Images are resized as the eval pipeline resizes them, padded to a fixed batch, run through
the plain or test-time-augmented predict program (batch-sharded over every local device),
and the boxes scaled back to each image's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from m2det_jax import distributed as shd
from m2det_jax.core.preprocess import resize
from m2det_jax.inference.predict import config_for_size, make_predict_fn, make_tta_fn, passes_at
from m2det_jax.inference.variables import prepare_variables


def make_detector(
    cfg, variables, *, batch_size: int = 1, tta_sizes: Sequence[int] | None = None,
    tta_flip: bool = False, mesh: Mesh | None = None,
) -> Callable[[Sequence[np.ndarray]], dict[str, np.ndarray]]:  # fmt: skip
    """images (uint8 RGB, any sizes, at most batch_size) -> numpy detections in their pixels.

    A fixed batch (the last one is padded), so each program compiles once, split over the
    devices of `mesh` (default: every local device; the batch is rounded up to a multiple
    of their count). With `tta_sizes` or `tta_flip`: `make_tta_fn` over those sizes, every
    pass of the whole batch in one program, sharded the same way.
    """
    sizes = tuple(tta_sizes or ())
    tta = bool(sizes or tta_flip)
    sizes = sizes or (int(cfg.model.input_size),)
    mesh = mesh if mesh is not None else shd.make_mesh(jax.local_devices())
    n_dev = int(mesh.devices.size)
    batch = -(-int(batch_size) // n_dev) * n_dev
    fn = make_tta_fn(cfg, sizes, tta_flip, mesh=mesh) if tta else make_predict_fn(cfg, mesh)
    variables = prepare_variables(cfg, variables, mesh)

    def run(ims):
        n = len(ims)
        xs = [pad_batch(prepare_images(ims, cfg, s)[0], batch) for s in sizes]
        image_sizes = pad_batch(np.array([im.shape[:2] for im in ims], np.float32), batch, 1.0)
        dets = jax.device_get(fn(variables, tuple(xs) if tta else xs[0], image_sizes))
        return {k: np.asarray(v)[:n] for k, v in dets.items()}

    return run


def prepare_images(
    images: Sequence[np.ndarray], cfg: ml_collections.ConfigDict, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images of any sizes -> (uint8 [B, S, S, 3], image_sizes float32 [B, 2]
    (height, width)).

    The eval pipeline's resize: cv2 INTER_LINEAR to S x S (aspect not kept), as the
    original. S is `size` or cfg.model.input_size. `preprocess` runs on the device.
    """
    s = int(size or cfg.model.input_size)
    x = np.stack([resize(np.asarray(im, np.uint8), s) for im in images])
    image_sizes = np.array([im.shape[:2] for im in images], np.float32)
    return x, image_sizes


def pad_batch(x: np.ndarray, batch: int, value: float = 0) -> np.ndarray:
    """Pads axis 0 of `x` with `value` to `batch` rows (a fixed shape: one compilation)."""
    if x.shape[0] == batch:
        return x
    pad = np.full((batch - x.shape[0],) + x.shape[1:], value, x.dtype)
    return np.concatenate([x, pad])


def tta_passes(variables, images: Sequence[np.ndarray], cfg, sizes: Sequence[int],
               flip: bool = True) -> list[tuple[jax.Array, jax.Array]]:  # fmt: skip
    """Decoded candidates of every TTA pass of uint8 RGB images: [(boxes [B, P_s, 4]
    normalized, scores [B, P_s, C])], for each size the plain pass then the flipped one."""
    out = []
    for s in sizes:
        x, _ = prepare_images(images, cfg, s)
        out += jax.jit(passes_at(config_for_size(cfg, s), flip))(variables, x)
    return out
