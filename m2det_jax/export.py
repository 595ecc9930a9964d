"""Exports for inference: a params-only checkpoint and a self-contained serving artefact.

`export(cfg, variables, out)` writes

* `out/variables`: {"params", "batch_stats"} only (no optimizer state), optionally stored
  as bfloat16 (`bf16=True`, half the size; `checkpoints.load_variables` restores them as
  float32, the dtype of the model's variables).
* a serving artefact of preprocess + network + decode + NMS with the weights baked in:
  - `out/serving.jax_export` (default, no TensorFlow needed): `jax.export` serialization
    with a symbolic batch dimension; reload with `load_serving` (or
    `jax.export.deserialize(bytearray(data)).call(images, image_sizes)`) from any JAX of a
    compatible version, no m2det_jax code required.
  - `out/saved_model/` (TF SavedModel through orbax-export, only where `orbax.export` and
    TensorFlow import: the optional extra).
  - `out/serving.json`: what the served function takes and returns.

The served function: `fn(images, image_sizes)` with `images` uint8 RGB [B, S, S, 3] already
resized to the config's input size S (cv2-style bilinear, see `inference.preprocess`) and
`image_sizes` float32 [B, 2] (height, width) of the original images; it applies the config's
channel order / means / scale and returns `postprocess.detect`'s fixed-size dict (boxes in
pixels of image_sizes, scores, classes, valid, num_dropped, num_tie_dropped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2det_jax.checkpoints import save_variables
from m2det_jax.models import build_model
from m2det_jax.postprocess import make_detect_fn
from m2det_jax.priors import prior_boxes

SERVING_FILE = "serving.jax_export"
SAVED_MODEL_DIR = "saved_model"


def inference_variables(variables, bf16: bool = False) -> dict[str, Any]:
    """{"params", "batch_stats"} of `variables` as numpy, float leaves cast to bfloat16 if asked."""
    out = {k: variables[k] for k in ("params", "batch_stats") if k in variables}

    def cast(a):
        a = np.asarray(a)
        if bf16 and np.issubdtype(a.dtype, np.floating):
            return a.astype(jnp.bfloat16)
        return a

    return jax.tree.map(cast, out)


def make_serving_fn(cfg: ml_collections.ConfigDict, variables) -> Callable[..., dict]:
    """fn(images uint8 [B,S,S,3], image_sizes float32 [B,2]) -> detections (weights closed over).

    Weights stored in bfloat16 are cast back to float32 inside (compute stays in the
    config's dtype); preprocessing follows cfg.preprocess.
    """
    model = build_model(cfg)
    priors = jnp.asarray(prior_boxes(cfg))
    detect_fn = make_detect_fn(cfg)
    p = cfg.preprocess
    bgr = p.channel_order.lower() == "bgr"
    means = jnp.asarray(p.pixel_means, jnp.float32)
    scale = float(p.pixel_scale)

    def fn(images, image_sizes):
        v = jax.tree.map(
            lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, variables
        )
        x = images.astype(jnp.float32)
        if bgr:
            x = x[..., ::-1]
        x = x - means
        if scale != 1.0:
            x = x / scale
        out = model.apply(v, x, train=False)
        return detect_fn(out["loc"], out["logits"], priors, image_sizes.astype(jnp.float32))

    return fn


def export_jax(cfg, variables, path: str, batch: int = 0) -> str:
    """Serializes the serving function with `jax.export` to `path`.

    Args:
      batch: a fixed batch size, or 0 for a symbolic batch dimension ("b").
    Returns:
      a description of the batch dimension ("b" or the fixed size).
    """
    fn = jax.jit(make_serving_fn(cfg, jax.tree.map(jnp.asarray, variables)))
    s = int(cfg.model.input_size)
    if batch > 0:
        b: Any = batch
    else:
        (b,) = jax.export.symbolic_shape("b")
    exp = jax.export.export(fn)(
        jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), jax.ShapeDtypeStruct((b, 2), jnp.float32)
    )
    with open(path, "wb") as f:
        f.write(exp.serialize())
    return str(b)


def load_serving(path: str) -> Callable[..., dict]:
    """The function saved by `export_jax`: fn(images uint8 [B,S,S,3], image_sizes [B,2])."""
    with open(path, "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    return exp.call


def savedmodel_available() -> bool:
    """True when orbax-export and TensorFlow import (the optional `export` extra)."""
    try:
        import orbax.export  # noqa: F401
        import tensorflow  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def export_saved_model(cfg, variables, directory: str) -> None:  # pragma: no cover - needs TF
    """TF SavedModel of the serving function via orbax-export (signature 'serving_default').

    Inputs: {"images": uint8 [None, S, S, 3], "image_sizes": float32 [None, 2]}.
    """
    import tensorflow as tf
    from orbax.export import ExportManager, JaxModule, ServingConfig

    model_variables = jax.tree.map(jnp.asarray, variables)

    # Variables are the module's params here (orbax-export stores them as tf.Variables).
    def apply_fn(params, inputs):
        fn = make_serving_fn(cfg, params)
        return fn(inputs["images"], inputs["image_sizes"])

    module = JaxModule(
        model_variables,
        apply_fn,
        input_polymorphic_shape={"images": "b, ...", "image_sizes": "b, ..."},
    )
    s = int(cfg.model.input_size)
    spec = {
        "images": tf.TensorSpec([None, s, s, 3], tf.uint8, name="images"),
        "image_sizes": tf.TensorSpec([None, 2], tf.float32, name="image_sizes"),
    }
    ExportManager(module, [ServingConfig("serving_default", input_signature=[spec])]).save(
        directory
    )


def export(
    cfg: ml_collections.ConfigDict,
    variables,
    output: str,
    *,
    bf16: bool = False,
    batch: int = 0,
    serving: str = "auto",
) -> dict[str, str]:
    """Writes the inference checkpoint and the serving artefact to `output` (see module doc).

    Args:
      serving: "jax" (jax.export), "savedmodel" (orbax-export, needs TF), "auto" (SavedModel
        when available, else jax.export) or "none".
    Returns:
      {what: path} of everything written.
    """
    os.makedirs(output, exist_ok=True)
    inf = inference_variables(variables, bf16)
    source = "m2det export" + (" (bf16)" if bf16 else "")
    written = {"variables": save_variables(os.path.join(output, "variables"), inf, cfg, source)}
    if serving == "auto":
        serving = "savedmodel" if savedmodel_available() else "jax"
    meta = {
        "format": serving,
        "input_size": int(cfg.model.input_size),
        "inputs": {
            "images": "uint8 RGB [B, S, S, 3], resized to S x S (cv2-style bilinear)",
            "image_sizes": "float32 [B, 2] (height, width) of the original images",
        },
        "preprocess_inside": {
            "channel_order": cfg.preprocess.channel_order,
            "pixel_means": list(cfg.preprocess.pixel_means),
            "pixel_scale": float(cfg.preprocess.pixel_scale),
        },
        "outputs": "boxes [B,K,4] x1y1x2y2 pixels, scores [B,K], classes [B,K] (1..C-1), "
        "valid [B,K], num_dropped [B,C], num_tie_dropped [B]",
        "num_classes": int(cfg.model.num_classes),
        "weights_dtype": "bfloat16" if bf16 else "float32",
        "postprocess": cfg.postprocess.to_dict(),
    }
    if serving == "jax":
        path = os.path.join(output, SERVING_FILE)
        meta["batch"] = export_jax(cfg, inf, path, batch)
        written["serving"] = path
    elif serving == "savedmodel":
        if not savedmodel_available():
            raise SystemExit("error: --serving savedmodel needs orbax-export and tensorflow")
        path = os.path.join(output, SAVED_MODEL_DIR)
        export_saved_model(cfg, inf, path)
        meta["batch"] = "b"
        written["serving"] = path
    elif serving != "none":
        raise ValueError(f"serving={serving!r}: 'auto', 'jax', 'savedmodel' or 'none'")
    if serving != "none":
        with open(os.path.join(output, "serving.json"), "w") as f:
            json.dump(meta, f, indent=1)
        written["serving_meta"] = os.path.join(output, "serving.json")
    return written
