"""Exports for inference: a params-only checkpoint and a self-contained serving artefact.

`export(cfg, variables, out)` writes

* `out/variables`: {"params", "batch_stats"} only (no optimizer state), optionally stored
  as bfloat16 (`bf16=True`, half the size; `checkpoints.variables.load_variables` restores them as
  float32, the dtype of the model's variables).
* a serving artefact of preprocess + network + decode + NMS with the weights baked in:
  - `out/serving.jax_export` (default, no TensorFlow needed): `jax.export` serialization
    with a symbolic batch dimension; reload with `load_serving` (or
    `jax.export.deserialize(bytearray(data)).call(images, image_sizes)`) from any JAX of a
    compatible version, no m2det_jax code required.
  - `out/saved_model/` (TF SavedModel through orbax-export / jax2tf, signature
    "serving_default"; only where `orbax.export` and TensorFlow import: the optional
    `savedmodel` extra). Its batch size is fixed (`batch`, default 1): TensorFlow 2.21's
    XlaCallModule cannot refine the symbolic batch through the decomposition of jax's
    `top_k`, which the NMS uses. Reload with `load_saved_model`.
  - `out/model.onnx` (`serving="onnx"`, the optional `onnx` extra): preprocess + network +
    decode + softmax as a standard ONNX graph for onnxruntime / TensorRT / OpenVINO, fixed
    batch; the soft-NMS runs outside it (`inference.onnx_export`, `OnnxDetector`).
  - `out/serving.json`: what the served function takes and returns.
* `out/config.json`: the config, which `m2det eval/detect/export` use when given `out` as
  `--checkpoint` without `--config`.

The served function: `fn(images, image_sizes)` with `images` uint8 RGB [B, S, S, 3] already
resized to the config's input size S (cv2 INTER_LINEAR, see `inference.prepare_images`) and
`image_sizes` float32 [B, 2] (height, width) of the original images; it applies the
config's channel order / means / scale (`core.preprocess.preprocess`, inside the program) and
returns `postprocess.detect`'s fixed-size dict (boxes in
pixels of image_sizes, scores, classes, valid, num_dropped, num_tie_dropped).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import xla_bridge
from jax._src.export import _export
from jax._src.lib import _jax
from jax._src.lib.mlir.dialects import hlo

from m2det_jax.checkpoints.variables import save_variables
from m2det_jax.inference import onnx_export
from m2det_jax.inference.predict import make_predict_fn
from m2det_jax.inference.variables import prepare_variables
from m2det_jax.paths import as_path

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
    predict = make_predict_fn(cfg)
    variables = prepare_variables(cfg, variables)  # folded BN if cfg.eval says so

    def fn(images, image_sizes):
        v = jax.tree.map(
            lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, variables
        )
        return predict(v, images, image_sizes.astype(jnp.float32))

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
    as_path(path).write_bytes(bytes(exp.serialize()))
    return str(b)


def load_serving(path: str) -> Callable[..., dict]:
    """The function saved by `export_jax`: fn(images uint8 [B,S,S,3], image_sizes [B,2])."""
    exp = jax.export.deserialize(bytearray(as_path(path).read_bytes()))
    return exp.call


def savedmodel_available() -> bool:
    """True when orbax-export and TensorFlow import (the optional `export` extra)."""
    try:
        import orbax.export  # noqa: F401
        import tensorflow  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """Serializes jax.export modules for the 12-week compatibility window while active.

    jax 0.10 writes StableHLO readable by consumers at most 4 weeks older (1.15 here), and
    lowers `lax.top_k` to a `chlo.top_k` composite of a newer encoding than TensorFlow
    2.21's XlaCallModule (StableHLO 1.13.7) reads ("unregistered operation
    'vhlo.composite_v2'"). jax has no public setting for the target version, so the
    private serializer is swapped for one targeting the 12-week window (1.13.7) while the
    SavedModel is written, then restored.
    """
    original = getattr(_export, "_module_to_bytecode", None)
    if original is None:  # pragma: no cover - guards a jax upgrade past the pinned range
        raise RuntimeError(
            "this jax has no jax._src.export._export._module_to_bytecode; "
            "the SavedModel export needs jax>=0.10.2,<0.11 (see pyproject.toml)"
        )
    target = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_12
    )

    def to_bytecode(module):
        backend = xla_bridge.get_backend()
        return _jax.mlir.serialize_portable_artifact(module, target, backend.serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def export_saved_model(cfg, variables, directory: str, batch: int = 1) -> None:
    """TF SavedModel of the serving function via orbax-export (signature "serving_default").

    Inputs: {"images": uint8 [batch, S, S, 3], "image_sizes": float32 [batch, 2]}; outputs
    the serving function's dict. The batch is fixed (see the module docstring).
    """
    if batch < 1:
        raise ValueError(f"batch={batch}: the SavedModel needs a fixed batch size >= 1")
    import tensorflow as tf
    from orbax.export import ExportManager, JaxModule, ServingConfig

    model_variables = jax.tree.map(jnp.asarray, variables)

    # Variables are the module's params here (orbax-export stores them as tf.Variables).
    def apply_fn(params, inputs):
        fn = make_serving_fn(cfg, params)
        return fn(inputs["images"], inputs["image_sizes"])

    s = int(cfg.model.input_size)
    spec = {
        "images": tf.TensorSpec([batch, s, s, 3], tf.uint8, name="images"),
        "image_sizes": tf.TensorSpec([batch, 2], tf.float32, name="image_sizes"),
    }
    with _stablehlo_for_tensorflow():
        module = JaxModule(model_variables, apply_fn)
        manager = ExportManager(
            module, [ServingConfig("serving_default", input_signature=[spec])]
        )
        manager.save(directory)


def load_saved_model(directory: str) -> Callable[..., dict]:
    """The SavedModel written by `export_saved_model` as fn(images, image_sizes) -> dict of
    numpy arrays (needs TensorFlow)."""
    import tensorflow as tf

    signature = tf.saved_model.load(directory).signatures["serving_default"]

    def fn(images, image_sizes):
        out = signature(
            images=tf.constant(np.asarray(images, np.uint8)),
            image_sizes=tf.constant(np.asarray(image_sizes, np.float32)),
        )
        return {k: v.numpy() for k, v in out.items()}

    return fn


def export(
    cfg: ml_collections.ConfigDict,
    variables,
    output: str,
    *,
    bf16: bool = False,
    batch: int = 0,
    serving: str = "jax",
    labels: dict[str, list] | None = None,
) -> dict[str, str]:
    """Writes the inference checkpoint and the serving artefact to `output` (see module doc).

    Args:
      batch: the serving batch size; 0 = symbolic for jax.export, 1 for the SavedModel
        and ONNX (whose batch is always fixed).
      serving: "jax" (jax.export), "savedmodel" (orbax-export, needs TF), "onnx" (network +
        decode as ONNX, needs onnx), "auto" (SavedModel when available, else jax.export)
        or "none".
      labels: {"class_names", "category_ids"} (`checkpoints.variables.read_labels` of the source),
        stored with the variables and in serving.json.
    Returns:
      {what: path} of everything written.
    """
    out = as_path(output)
    out.mkdir(parents=True, exist_ok=True)
    inf = inference_variables(variables, bf16)
    source = "m2det export" + (" (bf16)" if bf16 else "")
    written = {"variables": save_variables(os.fspath(out / "variables"), inf, cfg, source,
                                           labels=labels)}  # fmt: skip
    (out / "config.json").write_text(cfg.to_json_best_effort(indent=2))  # eval/detect read it
    written["config"] = os.fspath(out / "config.json")
    if serving == "auto":
        serving = "savedmodel" if savedmodel_available() else "jax"
    meta = {
        "format": serving,
        "input_size": int(cfg.model.input_size),
        "inputs": {
            "images": "uint8 RGB [B, S, S, 3], resized to S x S (cv2 INTER_LINEAR)",
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
        "labels": labels,
        "weights_dtype": "bfloat16" if bf16 else "float32",
        "postprocess": cfg.postprocess.to_dict(),
    }
    if serving == "jax":
        path = os.fspath(out / SERVING_FILE)
        meta["batch"] = export_jax(cfg, inf, path, batch)
        written["serving"] = path
    elif serving == "savedmodel":
        if not savedmodel_available():
            raise SystemExit("error: --serving savedmodel needs orbax-export and tensorflow")
        path = os.fspath(out / SAVED_MODEL_DIR)
        batch = batch if batch > 0 else 1
        export_saved_model(cfg, inf, path, batch)
        meta["batch"] = str(batch)
        written["serving"] = path
    elif serving == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise SystemExit("error: --serving onnx needs the onnx package "
                             "(pip install -e '.[onnx]')") from None
        path = os.fspath(out / onnx_export.ONNX_FILE)
        batch = batch if batch > 0 else 1
        info = onnx_export.export_onnx(cfg, inf, path, batch)
        meta["batch"] = str(batch)
        meta["outputs"] = ("boxes [B,P,4] x1y1x2y2 pixels of image_sizes (not clipped), "
                           "scores [B,P,C] softmax (class 0 background): the NMS input; "
                           "NMS outside the graph (m2det_jax.inference.onnx_export."
                           "OnnxDetector runs postprocess.nms after onnxruntime)")
        meta["onnx"] = {"opset": onnx_export.OPSET, "nodes": info["nodes"]}
        written["serving"] = path
    elif serving != "none":
        raise ValueError(f"serving={serving!r}: 'auto', 'jax', 'savedmodel', 'onnx' or 'none'")
    if serving != "none":
        (out / "serving.json").write_text(json.dumps(meta, indent=1))
        written["serving_meta"] = os.fspath(out / "serving.json")
    return written
