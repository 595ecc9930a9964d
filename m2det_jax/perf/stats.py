"""Model size and cost: parameter counts and convolution MACs (counted as the paper and the
official code count them: multiply-accumulates of the convolutions, docs/original.md §8)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import abstract_variables, build_model


def count_params(params) -> int:
    """Number of trainable scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _conv_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            out_feat = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += math.prod(out) * math.prod(rhs) // out_feat
        for sub in _sub_jaxprs(eqn):
            total += _conv_macs(sub)
    return total


def count_macs(model, variables, input_size: int, batch: int = 1) -> int:
    """Convolution multiply-accumulates of one forward pass (bias adds not counted)."""
    x = jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.float32)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return _conv_macs(closed.jaxpr)


def model_summary(cfg) -> dict:
    """Params, GMACs per image and priors of `cfg` (shapes only, nothing is computed)."""
    model = build_model(cfg)
    variables = abstract_variables(cfg, model)
    return {
        "params": count_params(variables["params"]),
        "gmacs": count_macs(model, variables, cfg.model.input_size) / 1e9,
        "priors": int(prior_boxes(cfg).shape[0]),
    }
