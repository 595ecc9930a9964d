"""`make_detector`: uint8 RGB images of any size -> numpy detections in their own pixels.

Images are resized as the eval pipeline resizes them, padded to a fixed batch, run through
the plain or test-time-augmented predict program (batch-sharded over every local device),
and the boxes scaled back to each image's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from m2det_jax import distributed as shd
from m2det_jax.inference.predict import make_predict_fn, make_tta_fn, pad_batch, prepare_images
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
