"""Winograd F(4x4, 3x3) convolution for inference (float32; on by default on a CPU through
`eval.winograd="auto"`, see `inference.prepare_variables`).

A 3x3 stride-1 convolution computes each 4x4 block of outputs from a 6x6 input tile with
144 multiplications per input / output channel pair; Winograd's minimal filtering
algorithm (Lavin & Gray, 2016) does it with 36: the input tiles and the kernel are
transformed (Y = A^T [(G g G^T) * (B^T d B)] A, interpolation points 0, +-1, +-2, inf),
the 36 element-wise products over channels become 36 matrix products
[tiles, C] @ [C, K], and the output transform sums them back. The network's arithmetic
is cut ~4x on the layers it replaces, at the price of moving transformed tiles through
memory, so it pays only where channels are many and pictures not tiny (`plan`).

Results differ from the direct convolution by float32 rounding amplified by the
transform's constants: up to ~2e-5 of the layer's largest output (tested). It is meant for
XLA:CPU, whose direct convolutions already run near the machine's matmul peak; GPU and
TPU libraries choose their own algorithms, so leave it off there.

`prepare_winograd(model, variables, shape)` traces the network once (shapes only),
picks the eligible convolutions (`plan`) and stores their transformed kernels
[36, C, K] in a `winograd` collection next to the unchanged parameters;
`apply_inference` (models/fold.py) then runs those layers through `winograd_conv`, via a
Flax method interceptor (no module or parameter changes). It composes with
`fold_batchnorm` (fold first, so the transformed kernels carry the BatchNorm scale).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WINOGRAD = "winograd"  # the collection holding transformed kernels
M = 4  # output tile (4x4); input tile M + 2 = 6
T = M + 2

# F(4x4, 3x3) with points 0, 1, -1, 2, -2 and infinity.
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)  # fmt: skip
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)  # fmt: skip
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)  # fmt: skip


@jax.jit
def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, C, K] HWIO kernel -> [36, C, K] transformed kernel G g G^T in float32, on the
    kernel's device, whatever the kernel's dtype: its constants (1/24 ... 1) and the
    output transform's (up to 8) would amplify a bfloat16 rounding of the result far
    beyond that of bfloat16 weights."""
    if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_kernel: expected a [3, 3, C, K] kernel, got {kernel.shape}")
    g = jnp.asarray(_G, jnp.float32)
    u = jnp.einsum("xi,ijck,yj->xyck", g, kernel.astype(jnp.float32), g,
                   precision=jax.lax.Precision.HIGHEST)  # fmt: skip
    return u.reshape(T * T, *kernel.shape[2:])


def winograd_conv(x: jax.Array, u: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """3x3 stride-1 convolution of NHWC `x` with a `winograd_kernel` `u` [36, C, K];
    `padding` = (rows, columns) added on both sides, as torch / the direct conv."""
    n, h, w, c = x.shape
    k = u.shape[-1]
    ho, wo = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    th, tw = -(-ho // M), -(-wo // M)
    # Tiles start every M pixels and overlap by 2: with the padded input viewed as
    # [th + 1, M] rows ([tw + 1, M] columns), row r of tile i is element (i + r // M, r % M),
    # so each of the 6 row (column) offsets is a contiguous slice. The transforms are small
    # matrix products over those 6 offsets (a few ops per layer: quick to compile).
    hp, wp = (th + 1) * M, (tw + 1) * M
    x = jnp.pad(x, ((0, 0), (padding[0], hp - h - padding[0]),
                    (padding[1], wp - w - padding[1]), (0, 0)))  # fmt: skip
    x = x.reshape(n, th + 1, M, tw + 1, M, c)
    bt, at = jnp.asarray(_BT, x.dtype), jnp.asarray(_AT, x.dtype)
    exact = jax.lax.Precision.HIGHEST  # the transforms: no reduced-precision matmuls

    d = jnp.stack([x[:, r // M:r // M + th, r % M] for r in range(T)])  # [6, n, th, tw+1, M, c]
    d = jnp.einsum("ar,rnhwmc->anhwmc", bt, d, precision=exact)  # B^T along rows
    d = jnp.stack([d[:, :, :, s // M:s // M + tw, s % M] for s in range(T)], axis=1)
    v = jnp.einsum("bs,asnhwc->abnhwc", bt, d, precision=exact)  # ... and columns
    m = jnp.einsum("tpc,tck->tpk", v.reshape(T * T, n * th * tw, c), u)  # 36 GEMMs
    m = m.reshape(T, T, n, th, tw, k)
    y = jnp.einsum("ia,abnhwk->ibnhwk", at, m, precision=exact)  # A^T along rows
    y = jnp.einsum("jb,ibnhwk->nhiwjk", at, y, precision=exact)  # ... and columns
    return y.reshape(n, th * M, tw * M, k)[:, :ho, :wo]


def _symmetric_padding(padding) -> tuple[int, int] | None:
    """(rows, columns) of an nn.Conv padding given as ints or symmetric pairs, else None."""
    if isinstance(padding, int):
        return padding, padding
    if isinstance(padding, str) or len(padding) != 2:
        return None
    out = []
    for p in padding:
        p = (p, p) if isinstance(p, int) else tuple(p)
        if len(p) != 2 or p[0] != p[1]:
            return None
        out.append(int(p[0]))
    return out[0], out[1]


def _eligible(module: nn.Module) -> bool:
    """A float32 3x3 convolution, stride 1, no dilation, no groups, symmetric padding."""
    def ones(v):
        return v is None or all(int(e) == 1 for e in np.atleast_1d(v))

    return (isinstance(module, nn.Conv) and tuple(module.kernel_size) == (3, 3)
            and ones(module.strides) and ones(module.kernel_dilation)
            and ones(module.input_dilation) and module.feature_group_count == 1
            and module.dtype in (None, jnp.float32)
            and _symmetric_padding(module.padding) is not None)  # fmt: skip


class Candidate(NamedTuple):
    """An eligible convolution as `candidates` finds it for one input shape."""

    path: tuple[str, ...]
    input_shape: tuple[int, ...]  # [B, H, W, C]
    features: int  # K
    padding: tuple[int, int]

    @property
    def pixels(self) -> int:
        """Output pixels per image."""
        return ((self.input_shape[1] + 2 * self.padding[0] - 2)
                * (self.input_shape[2] + 2 * self.padding[1] - 2))  # fmt: skip


def candidates(model: nn.Module, shape) -> list[Candidate]:
    """Every convolution of `model` that Winograd can replace (3x3, stride 1, undilated,
    ungrouped, float32, symmetric padding) with its input shape for images of `shape`
    ([B, H, W, 3]), in call order; found by tracing the network once (shapes only)."""
    found: dict[tuple[str, ...], Candidate] = {}

    def spy(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and _eligible(mod):
            path = tuple(mod.path)
            found.setdefault(path, Candidate(path, tuple(args[0].shape), int(mod.features),
                                             _symmetric_padding(mod.padding)))  # fmt: skip
        return next_fun(*args, **kwargs)

    def run(x):
        variables = model.init(jax.random.key(0), x)
        with nn.intercept_methods(spy):
            return model.apply(variables, x, train=False)

    jax.eval_shape(run, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    return list(found.values())


def plan(model: nn.Module, shape, min_channels: int = 256,
         min_pixels: int = 400) -> list[tuple[str, ...]]:  # fmt: skip
    """Paths of the convolutions that `prepare_winograd` transforms for images of `shape`:
    the `candidates` whose input and output channels are both >= `min_channels` and whose
    output has >= `min_pixels` pixels. The defaults come from per-layer timings on
    XLA:CPU (`python benchmarks/winograd_layers.py` prints them for your machine): below
    ~256 channels or ~20x20 pixels the transforms cost more than the multiplications they
    save."""
    return [c.path for c in candidates(model, shape)
            if min(c.input_shape[-1], c.features) >= min_channels
            and c.pixels >= min_pixels]  # fmt: skip


def prepare_winograd(model: nn.Module, variables: dict[str, Any], shape,
                     **plan_kw) -> dict[str, Any]:  # fmt: skip
    """`variables` plus the `winograd` collection: the transformed kernel of every
    convolution `plan` picks for inputs of `shape` (module docstring); `variables`
    without one when the plan is empty."""
    variables = {k: v for k, v in variables.items() if k != WINOGRAD}
    coll: dict[str, Any] = {}
    for path in plan(model, shape, **plan_kw):
        node, out = variables["params"], coll
        for name in path:
            node = node[name]
            out = out.setdefault(name, {})
        out["kernel"] = winograd_kernel(node["kernel"])
    return {**variables, WINOGRAD: coll} if coll else variables


def interceptor(next_fun, args, kwargs, context):
    """Runs a convolution with a `winograd` kernel through `winograd_conv` (+ its bias)."""
    mod = context.module
    if (context.method_name != "__call__" or not isinstance(mod, nn.Conv)
            or not mod.has_variable(WINOGRAD, "kernel")):  # fmt: skip
        return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0], jnp.float32)
    y = winograd_conv(x, mod.get_variable(WINOGRAD, "kernel"), _symmetric_padding(mod.padding))
    if mod.use_bias:
        y = y + mod.get_variable("params", "bias")
    return y
