"""The jaxpr -> ONNX translator behind `m2det export --serving onnx` (`inference.onnx_export`).

`jaxpr_to_onnx(fn, args, input_names, output_names)` traces `fn` to a jaxpr, inlines its
nested calls (jit, custom_jvp, ...) and emits, per primitive, standard ONNX operators
(opset 17); arrays closed over become initializers, literals constants. It covers what
M2Det's inference programs use (NHWC convolutions and max pooling between Transposes to
ONNX's NCHW, nearest upsampling by `jnp.take`, the SFAM's dense layers as Einsum, the
elementwise and reduction ops of preprocessing, decode and softmax); any other primitive
raises `UnsupportedPrimitiveError` naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jax_core
import numpy as np

OPSET = 17


class UnsupportedPrimitiveError(NotImplementedError):
    """A jaxpr primitive the translator has no ONNX rule for."""


@dataclasses.dataclass
class _Graph:
    nodes: list = dataclasses.field(default_factory=list)
    inits: list = dataclasses.field(default_factory=list)
    count: int = 0

    def name(self, hint: str = "t") -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint: str = "c") -> str:
        from onnx import numpy_helper  # the onnx extra

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1,
             **attrs) -> list[str]:  # fmt: skip
        from onnx import helper

        outs = [self.name(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) \
            else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs

    def one(self, op, inputs, **attrs) -> str:
        return self.node(op, inputs, 1, **attrs)[0]


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def jaxpr_to_onnx(fn: Callable, args: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
                  output_names: Sequence[str]):  # fmt: skip
    """The ONNX ModelProto of `fn` traced at `args` (arrays closed over become initializers)."""
    from onnx import helper

    closed = jax.make_jaxpr(fn)(*args)
    g = _Graph()
    env: dict[Any, str] = {}
    for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        env[v] = g.const(np.asarray(c), "w")
    for v, n in zip(closed.jaxpr.invars, input_names, strict=True):
        env[v] = n
    outs = _emit(g, closed.jaxpr, env)
    for o, n in zip(outs, output_names, strict=True):
        g.node("Identity", [o], [n])
    inputs = [helper.make_tensor_value_info(n, _onnx_dtype(a.dtype), a.shape)
              for n, a in zip(input_names, args, strict=True)]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, _onnx_dtype(v.aval.dtype), v.aval.shape)
               for n, v in zip(output_names, closed.jaxpr.outvars, strict=True)]  # fmt: skip
    graph = helper.make_graph(g.nodes, "m2det", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="m2det_jax")  # fmt: skip
    model.ir_version = 8
    return model


def _read(g: _Graph, env, v) -> str:
    if isinstance(v, jax_core.Literal):
        return g.const(np.asarray(v.val, v.aval.dtype), "lit")
    return env[v]


_SUBJAXPR = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
             "custom_vjp_call_jaxpr", "remat", "checkpoint")  # fmt: skip


def _emit(g: _Graph, jaxpr, env) -> list[str]:
    for eqn in jaxpr.eqns:
        ins = [_read(g, env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _SUBJAXPR:
            sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") \
                or eqn.params.get("fun_jaxpr")
            sub_jaxpr = getattr(sub, "jaxpr", sub)
            consts = getattr(sub, "consts", [])
            sub_env = {v: g.const(np.asarray(c), "w")
                       for v, c in zip(sub_jaxpr.constvars, consts, strict=True)}  # fmt: skip
            sub_env.update(zip(sub_jaxpr.invars, ins, strict=False))
            outs = _emit(g, sub_jaxpr, sub_env)
        else:
            rule = _RULES.get(name)
            if rule is None:
                raise UnsupportedPrimitiveError(
                    f"ONNX export: no rule for the JAX primitive {name!r} "
                    f"({eqn.outvars[0].aval.str_short() if eqn.outvars else ''})")
            out = rule(g, ins, eqn)
            outs = [out] if isinstance(out, str) else out
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [_read(g, env, v) for v in jaxpr.outvars]


def _shape(eqn, i=0):
    return tuple(eqn.invars[i].aval.shape)


def _out_shape(eqn):
    return tuple(eqn.outvars[0].aval.shape)


def _elementwise(op):
    return lambda g, ins, eqn: g.one(op, ins)


def _convert(g, ins, eqn):
    return g.one("Cast", ins, to=_onnx_dtype(eqn.params["new_dtype"]))


def _broadcast_in_dim(g, ins, eqn):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    src = _shape(eqn)
    inter = [1] * len(shape)
    for s, d in zip(src, dims, strict=True):
        inter[d] = s
    x = g.one("Reshape", [ins[0], g.const(np.array(inter, np.int64))])
    if tuple(inter) == tuple(shape):
        return x
    return g.one("Expand", [x, g.const(np.array(shape, np.int64))])


def _reshape(g, ins, eqn):
    return g.one("Reshape", [ins[0], g.const(np.array(_out_shape(eqn), np.int64))])


def _reduce(op):
    def rule(g, ins, eqn):
        axes = np.array(eqn.params["axes"], np.int64)
        if op == "ReduceSum":
            return g.one(op, [ins[0], g.const(axes)], keepdims=0)
        return g.one(op, ins, axes=[int(a) for a in axes], keepdims=0)

    return rule


def _argmax(g, ins, eqn):
    (axis,) = eqn.params["axes"]
    out = g.one("ArgMax", ins, axis=int(axis), keepdims=0, select_last_index=0)
    return g.one("Cast", [out], to=_onnx_dtype(eqn.params["index_dtype"]))


def _to_nchw(g, x):
    return g.one("Transpose", [x], perm=[0, 3, 1, 2])


def _to_nhwc(g, x):
    return g.one("Transpose", [x], perm=[0, 2, 3, 1])


def _conv(g, ins, eqn):
    p = eqn.params
    dn = p["dimension_numbers"]
    if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
        raise UnsupportedPrimitiveError(f"ONNX export: convolution layout {dn} (NHWC/HWIO only)")
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise UnsupportedPrimitiveError("ONNX export: transposed / batch-grouped convolution")
    pads = [int(a) for a, _ in p["padding"]] + [int(b) for _, b in p["padding"]]
    kernel = g.one("Transpose", [ins[1]], perm=[3, 2, 0, 1])  # HWIO -> OIHW (folded once)
    y = g.one("Conv", [_to_nchw(g, ins[0]), kernel], strides=list(p["window_strides"]),
              pads=pads, dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])
    return _to_nhwc(g, y)


def _max_pool(g, ins, eqn):
    p = eqn.params
    win, strides, pad = p["window_dimensions"], p["window_strides"], p["padding"]
    if win[0] != 1 or win[3] != 1 or strides[0] != 1 or strides[3] != 1 or \
            any(d != 1 for d in p["base_dilation"] + p["window_dilation"]):
        raise UnsupportedPrimitiveError("ONNX export: reduce_window_max other than 2-D pooling")
    pads = [int(pad[1][0]), int(pad[2][0]), int(pad[1][1]), int(pad[2][1])]
    y = g.one("MaxPool", [_to_nchw(g, ins[0])], kernel_shape=[win[1], win[2]],
              strides=[strides[1], strides[2]], pads=pads)
    return _to_nhwc(g, y)


def _dot_general(g, ins, eqn):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs = [next(letters) for _ in _shape(eqn, 0)]
    rhs = [next(letters) for _ in _shape(eqn, 1)]
    for a, b in zip(list(lc) + list(lb), list(rc) + list(rb), strict=True):
        rhs[b] = lhs[a]
    out = [lhs[d] for d in lb] + [c for i, c in enumerate(lhs) if i not in lc and i not in lb]
    out += [c for i, c in enumerate(rhs) if i not in rc and i not in rb]
    eq = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
    return g.one("Einsum", ins, equation=eq)


def _slice(g, ins, eqn):
    p = eqn.params
    starts = np.array(p["start_indices"], np.int64)
    ends = np.array(p["limit_indices"], np.int64)
    axes = np.arange(len(starts), dtype=np.int64)
    steps = np.array(p["strides"] or [1] * len(starts), np.int64)
    return g.one("Slice", [ins[0], g.const(starts), g.const(ends), g.const(axes), g.const(steps)])


def _rev(g, ins, eqn):
    dims = np.array(eqn.params["dimensions"], np.int64)
    n = len(dims)
    big = np.iinfo(np.int64).min
    return g.one("Slice", [ins[0], g.const(np.full(n, -1, np.int64)),
                           g.const(np.full(n, big, np.int64)), g.const(dims),
                           g.const(np.full(n, -1, np.int64))])  # fmt: skip


def _select_n(g, ins, eqn):
    if len(ins) != 3:
        raise UnsupportedPrimitiveError("ONNX export: select_n with more than two cases")
    pred = ins[0]
    if eqn.invars[0].aval.dtype != np.bool_:
        pred = g.one("Cast", [pred], to=_onnx_dtype(np.bool_))
    return g.one("Where", [pred, ins[2], ins[1]])


def _integer_pow(g, ins, eqn):
    y = eqn.params["y"]
    if y == 2:
        return g.one("Mul", [ins[0], ins[0]])
    dtype = eqn.invars[0].aval.dtype
    return g.one("Pow", [ins[0], g.const(np.array(y, dtype))])


def _rsqrt(g, ins, eqn):
    return g.one("Reciprocal", [g.one("Sqrt", ins)])


def _square(g, ins, eqn):
    return g.one("Mul", [ins[0], ins[0]])


def _iota(g, ins, eqn):
    p = eqn.params
    shape, dim = tuple(p["shape"]), p["dimension"]
    idx = np.arange(shape[dim], dtype=p["dtype"]).reshape(
        [-1 if i == dim else 1 for i in range(len(shape))])
    return g.const(np.broadcast_to(idx, shape).copy(), "iota")


def _concatenate(g, ins, eqn):
    return g.one("Concat", ins, axis=int(eqn.params["dimension"]))


def _stack(g, ins, eqn):
    axis = int(eqn.params["axis"])
    return g.one("Concat", [g.one("Unsqueeze", [x, g.const(np.array([axis], np.int64))])
                            for x in ins], axis=axis)  # fmt: skip


def _split(g, ins, eqn):
    sizes = np.array(eqn.params["sizes"], np.int64)
    return g.node("Split", [ins[0], g.const(sizes)], len(sizes), axis=int(eqn.params["axis"]))


def _transpose(g, ins, eqn):
    return g.one("Transpose", ins, perm=[int(d) for d in eqn.params["permutation"]])


def _clamp(g, ins, eqn):
    lo, x, hi = ins
    return g.one("Min", [g.one("Max", [x, lo]), hi])


def _ne(g, ins, eqn):
    return g.one("Not", [g.one("Equal", ins)])


def _copy(g, ins, eqn):
    return g.one("Identity", ins)


def _pad(g, ins, eqn):
    cfg = eqn.params["padding_config"]
    if any(i != 0 or lo < 0 or hi < 0 for lo, hi, i in cfg):
        raise UnsupportedPrimitiveError("ONNX export: pad with interior or negative padding")
    pads = np.array([lo for lo, _, _ in cfg] + [hi for _, hi, _ in cfg], np.int64)
    return g.one("Pad", [ins[0], g.const(pads), ins[1]])


def _gather_take(g, ins, eqn):
    """`jnp.take(x, idx, axis=a)`'s gather (what nearest upsampling by other than 2x
    uses): ONNX Gather along a. Other gathers are not translated."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape, idx_shape = _shape(eqn, 0), _shape(eqn, 1)
    (a,) = dn.collapsed_slice_dims if len(dn.collapsed_slice_dims) == 1 else (None,)
    take_like = (a is not None and tuple(dn.start_index_map) == (a,)
                 and not dn.operand_batching_dims and len(idx_shape) == 2
                 and idx_shape[1] == 1 and sizes[a] == 1
                 and all(sizes[i] == shape[i] for i in range(len(shape)) if i != a)
                 and tuple(dn.offset_dims) == tuple(i for i in range(len(shape)) if i != a))
    if not take_like:
        raise UnsupportedPrimitiveError(f"ONNX export: gather {dn} (only jnp.take along an axis)")
    idx = g.one("Reshape", [ins[1], g.const(np.array([idx_shape[0]], np.int64))])
    return g.one("Gather", [ins[0], idx], axis=int(a))


_RULES: dict[str, Callable] = {
    "add": _elementwise("Add"), "sub": _elementwise("Sub"), "mul": _elementwise("Mul"),
    "div": _elementwise("Div"), "max": _elementwise("Max"), "min": _elementwise("Min"),
    "neg": _elementwise("Neg"), "exp": _elementwise("Exp"), "log": _elementwise("Log"),
    "sqrt": _elementwise("Sqrt"), "rsqrt": _rsqrt, "logistic": _elementwise("Sigmoid"),
    "tanh": _elementwise("Tanh"), "abs": _elementwise("Abs"), "floor": _elementwise("Floor"),
    "ceil": _elementwise("Ceil"), "pow": _elementwise("Pow"), "square": _square,
    "integer_pow": _integer_pow, "gt": _elementwise("Greater"), "lt": _elementwise("Less"),
    "ge": _elementwise("GreaterOrEqual"), "le": _elementwise("LessOrEqual"),
    "eq": _elementwise("Equal"), "ne": _ne, "and": _elementwise("And"),
    "or": _elementwise("Or"), "not": _elementwise("Not"),
    "convert_element_type": _convert, "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape, "squeeze": _reshape, "expand_dims": _reshape,
    "transpose": _transpose, "concatenate": _concatenate, "slice": _slice,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "argmax": _argmax,
    "conv_general_dilated": _conv, "reduce_window_max": _max_pool,
    "dot_general": _dot_general, "select_n": _select_n, "iota": _iota, "clamp": _clamp,
    "rev": _rev, "stack": _stack, "split": _split, "copy": _copy, "copy_p": _copy,
    "pad": _pad, "gather": _gather_take,
}  # fmt: skip
