"""Array primitives of the post-processing, with the XLA:CPU facts that chose their form.

Nothing here changes a value: each is the plain operation written the way XLA:CPU runs
fastest or rounds like the original's C float code.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Indices built in this package are in bounds by construction; saying so lets XLA:CPU emit
# plain gathers / scatters, faster than the default (clamp-and-mask) mode: `python
# benchmarks/postprocess_kernels.py`, row "gather [6, 8, 256]".
IN_BOUNDS = "promise_in_bounds"


def take(a: jnp.ndarray, idx: jnp.ndarray, axis: int) -> jnp.ndarray:
    """`jnp.take_along_axis` with indices known to be in bounds."""
    return jnp.take_along_axis(a, idx, axis=axis, mode=IN_BOUNDS)


def no_contract(x: jnp.ndarray) -> jnp.ndarray:
    """Identity on the non-negative products of the IoU that stops XLA from fusing them.

    XLA:CPU turns `p * q + r` into a fused multiply-add (one rounding instead of two);
    a `max(., 0)` between the multiply and the add blocks that, so the sum sees the
    rounded product as the C float code does. Only applied to values that are >= 0 (or to
    areas of decoded boxes, which are > 0), where it changes nothing.
    """
    return jnp.maximum(x, 0.0)


def cumsum(mask: jnp.ndarray) -> jnp.ndarray:
    """Inclusive count along axis 1 of a [N, kb] bool array (int32).

    Short rows (the soft-NMS buffers of the sparse layouts) use lax.cumsum: fewer
    kernels per loop step. Long rows use lax.associative_scan: jnp.cumsum's lowering was
    several times slower there on XLA:CPU (timed ad hoc; a matmul with a triangular 0/1
    matrix was no faster at kb <= 256).
    """
    if mask.shape[1] <= 256:
        return lax.cumsum(mask.astype(jnp.int32), axis=1)
    return lax.associative_scan(jnp.add, mask.astype(jnp.int32), axis=1)


def scatter_rows(target: jnp.ndarray, values: jnp.ndarray, nt: int, width: int):
    """out[t, k] = values where target (flat t * width + k) is in range, else 0:
    [nt, width] int32. A 1-D scatter (several times faster than the 2-D one on XLA:CPU,
    timed ad hoc); targets >= nt * width are dropped."""
    out = jnp.zeros(nt * width, jnp.int32)
    return out.at[target.reshape(-1)].set(values.reshape(-1), mode="drop").reshape(nt, width)
