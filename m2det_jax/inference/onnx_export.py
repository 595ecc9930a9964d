"""ONNX export: preprocess + network + decode + softmax as an ONNX graph (`m2det export
--serving onnx`), for onnxruntime, TensorRT or OpenVINO.

Why a translator of our own: the two existing paths do not fit. jax2onnx requires
`orbax-checkpoint<0.11.37` and flax >= 0.12 together with huggingface-hub, netron and
equinox, which cannot be installed beside this package's orbax; tf2onnx reads TensorFlow
graphs, while jax2tf now serializes to an opaque `XlaCallModule` (StableHLO) op that
tf2onnx cannot translate. The program exported here is small and fixed: the jaxpr of
`onnx_fn` (folded BatchNorm, no Winograd: plain convolutions) uses a few dozen
primitives, each translated to standard ONNX operators (opset 17) by `inference.onnx_graph`; any
other primitive is a one-line error naming it.

What the graph computes: `onnx_fn(images uint8 [B, S, S, 3] RGB resized to S x S,
image_sizes float32 [B, 2] (height, width))` -> `boxes` float32 [B, P, 4] x1, y1, x2, y2
in pixels of image_sizes (not clipped) and `scores` float32 [B, P, C] softmax (class 0
background): exactly `postprocess.decode_and_score` of the network's output, which is
what the NMS reads. The soft-NMS of the original is not an ONNX operator (ONNX's
NonMaxSuppression is hard NMS without a per-class soft decay), so it stays outside the
graph: `OnnxDetector` runs the graph in onnxruntime and then `postprocess.nms` with the
config's settings, giving `detect`'s rows. The batch size is fixed at export.

Layout: JAX convolutions here are NHWC; ONNX's are NCHW. Each convolution and pooling is
emitted between two Transposes, and onnxruntime's graph optimizer (ORT_ENABLE_ALL, the
default) cancels the pairs between consecutive layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.core.preprocess import preprocess
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.onnx_graph import OPSET, UnsupportedPrimitiveError, jaxpr_to_onnx
from m2det_jax.inference.postprocess import decode_and_score, make_nms_fn
from m2det_jax.models import build_model
from m2det_jax.models.fold import apply_inference, fold_batchnorm

ONNX_FILE = "model.onnx"


def onnx_config(cfg):
    """`cfg` for the ONNX graph: BatchNorm folded, plain convolutions (no Winograd)."""
    out = cfg.copy_and_resolve_references()
    out.unlock()
    out.eval.fold_batchnorm = True
    out.eval.winograd = "off"
    out.lock()
    return out


def onnx_fn(cfg, variables) -> Callable:
    """fn(images uint8 [B,S,S,3], image_sizes float32 [B,2]) -> (boxes [B,P,4] pixels,
    scores [B,P,C]) with folded weights closed over (what the ONNX graph computes)."""
    cfg = onnx_config(cfg)
    model = build_model(cfg)
    priors = jnp.asarray(prior_boxes(cfg))
    folded = fold_batchnorm(jax.tree.map(
        lambda a: np.asarray(a, np.float32) if np.issubdtype(np.asarray(a).dtype, np.floating)
        else np.asarray(a), {k: variables[k] for k in ("params", "batch_stats") if k in variables}))

    def fn(images, image_sizes):
        out = apply_inference(model, folded, preprocess(images, cfg))
        return decode_and_score(out["loc"], out["logits"], priors, cfg,
                                image_sizes.astype(jnp.float32))  # fmt: skip

    return fn


def export_onnx(cfg, variables, path: str, batch: int = 1) -> dict[str, Any]:
    """Writes the ONNX graph of `onnx_fn` for a fixed `batch` to `path`.

    Returns {"batch", "nodes", "ops": {op type: count}}.
    """
    import onnx  # the onnx extra

    if batch < 1:
        raise ValueError(f"batch={batch}: the ONNX graph needs a fixed batch size >= 1")
    s = int(cfg.model.input_size)
    args = (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8),
            jax.ShapeDtypeStruct((batch, 2), jnp.float32))  # fmt: skip
    model = jaxpr_to_onnx(onnx_fn(cfg, variables), args, ["images", "image_sizes"],
                          ["boxes", "scores"])  # fmt: skip
    onnx.checker.check_model(model)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"batch": batch, "nodes": len(model.graph.node), "ops": ops}


def onnx_session(path: str, threads: int = 0):
    """An onnxruntime CPU session of `path` (threads 0: onnxruntime's default)."""
    import onnxruntime as ort  # the onnx extra

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


class OnnxDetector:
    """The ONNX graph in onnxruntime + `postprocess.nms`: fn(images uint8 [B,S,S,3],
    image_sizes [B,2]) -> `detect`'s dict (the serving function's output)."""

    def __init__(self, cfg, path: str, threads: int = 0):
        self.session = onnx_session(path, threads)
        self.nms = make_nms_fn(cfg)

    def scores(self, images, image_sizes):
        boxes, scores = self.session.run(None, {
            "images": np.asarray(images, np.uint8),
            "image_sizes": np.asarray(image_sizes, np.float32)})  # fmt: skip
        return boxes, scores

    def __call__(self, images, image_sizes):
        boxes, scores = self.scores(images, image_sizes)
        # nms's boxes are normalized and scaled by image_sizes: pass pixel boxes unscaled.
        return jax.tree.map(np.asarray, self.nms(jnp.asarray(boxes), jnp.asarray(scores)))


__all__ = ["ONNX_FILE", "OPSET", "OnnxDetector", "UnsupportedPrimitiveError", "export_onnx",
           "jaxpr_to_onnx", "onnx_config", "onnx_fn", "onnx_session"]
