"""BatchNorm folded into the convolution before it, for inference.

Every BatchNorm that directly follows a bias-free convolution (BasicConv's `conv` -> `bn`,
ResNet's `convK` -> `bnK`, `downsample_conv` -> `downsample_bn`) computes, with running
statistics, `(conv(x) - mean) * gamma / sqrt(var + eps) + beta`, which is
`conv'(x) + b` with the kernel's output channels scaled by s = gamma / sqrt(var + eps) and
b = beta - mean * s. `fold_batchnorm(variables)` returns variables in which those pairs
are folded: the kernels scaled, the BatchNorm's params and statistics gone, and the bias
in a `folded` collection. `apply_inference(model, variables, x)` runs the network on them
(or on plain variables): a Flax method interceptor adds the bias after each folded
convolution and skips each folded BatchNorm. Module code and parameter names do not
change; the BatchNorm that normalises the first source (not after a convolution) stays.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax.models import winograd
from m2det_jax.models.winograd import WINOGRAD

FOLDED = "folded"  # the collection holding the folded convolutions' biases
EPS = 1e-5  # every BatchNorm of the model uses epsilon=1e-5


def _conv_name(bn_name: str) -> str | None:
    return bn_name.replace("bn", "conv") if "bn" in bn_name else None


def fold_batchnorm(variables: dict[str, Any]) -> dict[str, Any]:
    """Variables with each conv -> BatchNorm pair folded (module docstring); the result
    runs through `apply_inference` and gives the unfolded network's outputs up to float32
    rounding. Folding already folded variables returns them unchanged."""
    if FOLDED in variables:
        return variables
    if WINOGRAD in variables:
        raise ValueError("fold_batchnorm: fold before prepare_winograd (the transformed "
                         "kernels would keep the unfolded weights)")
    params = jax.tree.map(np.asarray, jax.device_get(variables["params"]))
    stats = jax.tree.map(np.asarray, jax.device_get(variables.get("batch_stats", {})))
    folded: dict[str, Any] = {}

    def walk(p: dict, s: dict, f: dict) -> None:
        for name in list(p):
            conv = _conv_name(name)
            if (conv and conv in p and "kernel" in p[conv] and "bias" not in p[conv]
                    and set(p[name]) == {"scale", "bias"} and name in s):  # fmt: skip
                scale = p[name]["scale"].astype(np.float64) / np.sqrt(
                    s[name]["var"].astype(np.float64) + EPS)  # fmt: skip
                kernel = p[conv]["kernel"]
                p[conv] = {**p[conv], "kernel": (kernel * scale).astype(kernel.dtype)}
                bias = p[name]["bias"] - s[name]["mean"].astype(np.float64) * scale
                f[conv] = {"bias": bias.astype(kernel.dtype)}
                del p[name], s[name]
            elif isinstance(p[name], dict):
                sub: dict[str, Any] = {}
                walk(p[name], s.get(name, {}), sub)
                if sub:
                    f[name] = sub

    params, stats = _copy(params), _copy(stats)
    walk(params, stats, folded)
    return {"params": params, "batch_stats": _prune(stats), FOLDED: folded}


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _prune(tree):
    """Drops the dicts left empty by folding."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and not module.has_variable("params", "scale") \
            and not module.has_variable("batch_stats", "mean"):  # fmt: skip
        return args[0]  # folded into the convolution before it
    out = next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv) and module.has_variable(FOLDED, "bias"):
        out = out + jnp.asarray(module.get_variable(FOLDED, "bias"), out.dtype)
    return out


def apply_inference(model: nn.Module, variables: dict[str, Any], x: jax.Array):
    """`model.apply(variables, x, train=False)`, for plain, `fold_batchnorm`ed and / or
    `prepare_winograd`ed variables."""
    with contextlib.ExitStack() as stack:
        if FOLDED in variables:
            stack.enter_context(nn.intercept_methods(_interceptor))
        if WINOGRAD in variables:  # inside the folding: its bias is added after the conv
            stack.enter_context(nn.intercept_methods(winograd.interceptor))
        return model.apply(variables, x, train=False)
