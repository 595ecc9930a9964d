"""The XLA:CPU facts `m2det_jax.postprocess` is built on, measured side by side.

    python benchmarks/postprocess_kernels.py

Prints:
  * the temporary memory of the compiled `detect` at 320 and 512 px (batch 1, 81 classes):
    above glibc's 32 MiB mmap threshold every call page-faults its temporaries afresh;
  * a gather from a [6, 8, 256] buffer with the default (clamp-and-mask) index mode vs
    `promise_in_bounds`;
  * sorting 80 x 1000 (prior, score) pairs as a (key, value) sort vs one packed int32 key;
  * the soft-NMS loop (50 selections, clustered boxes) on 8 x 128 vs 8 x 256 buffers;
  * the C-order soft-NMS loop (swaps, swap-with-last compaction) vs `_soft_nms_rows`
    (the untied loop, the C-order one only on ties), 50 selections on 16 x 1000;
  * the first maximum of each row of 16 x 1000 (50 times in a loop): `lax.top_k` of 1
    vs `_top1` (a max, then the first index holding it);
  * what code that never runs costs each call: a cond taking a trivial branch, its other
    branch 0 or 100 sorts (XLA:CPU sets up every buffer of the program per call).
Each timing is the median of at least 1 s of calls; the pairs run interleaved.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2det_jax import postprocess as pp
from m2det_jax.config import default_config
from m2det_jax.priors import prior_boxes


def _pair(name, fa, fb, args_a, args_b, labels):
    """Median us of two jitted functions, interleaved for at least 1 s each."""
    fa, fb = jax.jit(fa), jax.jit(fb)
    jax.block_until_ready((fa(*args_a), fb(*args_b)))
    ta, tb = [], []
    while sum(ta) < 1.0 or sum(tb) < 1.0:
        for f, a, ts in ((fa, args_a, ta), (fb, args_b, tb)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
    a_us, b_us = 1e6 * np.median(ta), 1e6 * np.median(tb)
    print(f"{name:<34} {labels[0]:>22} {a_us:9.1f} us   {labels[1]:>18} {b_us:9.1f} us"
          f"   {a_us / b_us:5.1f}x")  # fmt: skip


def _soft_nms_case(rng, nt, kb):
    c = 200 + 60 * rng.uniform(-1, 1, (nt, kb, 2))
    wh = rng.uniform(40, 80, (nt, kb, 2))
    cols = (c[..., 0] - wh[..., 0] / 2, c[..., 1] - wh[..., 1] / 2,
            c[..., 0] + wh[..., 0] / 2, c[..., 1] + wh[..., 1] / 2,
            rng.uniform(0.1, 1.0, (nt, kb)))  # fmt: skip
    d = pp._stack_buffer(tuple(jnp.asarray(x, jnp.float32) for x in cols), 1)
    return d, jnp.full((nt,), 100, jnp.int32)


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for size in (320, 512):
        cfg = default_config()
        cfg.model.input_size = size
        p = len(prior_boxes(cfg))
        s = pp.PostprocessSettings.from_config(cfg)
        fn = jax.jit(functools.partial(pp._detect_impl, s=s))
        shapes = [(1, p, 4), (1, p, 81), (p, 4), (1, 2)]
        compiled = fn.lower(*(jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"detect temporaries at {size} px ({p} priors): {temp / 2**20:.1f} MiB "
              f"(glibc mmap threshold: 32 MiB)")  # fmt: skip
    rng = np.random.default_rng(0)
    d = jnp.asarray(rng.random((6, 8, 256), np.float32))
    src = jnp.asarray(rng.integers(0, 256, (8, 256)).astype(np.int32))

    def gather(d, i, mode):
        return jnp.take_along_axis(d, jnp.broadcast_to(i[None], d.shape), axis=2, mode=mode)

    _pair("gather [6, 8, 256]", functools.partial(gather, mode=None),
          functools.partial(gather, mode="promise_in_bounds"), (d, src), (d, src),
          ("default mode", "promise_in_bounds"))  # fmt: skip
    idx = jnp.asarray(rng.integers(0, 30000, (80, 1000)).astype(np.int32))
    vals = jnp.asarray(rng.random((80, 1000), np.float32))

    def packed(i, v):
        key = jnp.sort(i * 1000 + jnp.arange(1000, dtype=i.dtype), axis=1)
        return key // 1000, jnp.take_along_axis(v, key % 1000, axis=1)

    _pair("sort 80 x 1000 by prior", lambda i, v: lax.sort((i, v), dimension=1, num_keys=1),
          packed, (idx, vals), (idx, vals), ("(key, value) sort", "packed int32 key"))  # fmt: skip
    s = pp.PostprocessSettings.from_config(default_config())
    loop = lambda d, n: pp._soft_nms(d, n, s, 50)  # noqa: E731
    _pair("soft-NMS, 50 selections", loop, loop, _soft_nms_case(rng, 8, 256),
          _soft_nms_case(rng, 8, 128), ("8 x 256", "8 x 128"))  # fmt: skip
    case = _soft_nms_case(rng, 16, 1000)
    _pair("soft-NMS 16 x 1000, 50 selections", lambda d, n: pp._soft_nms(d, n, s, 50)[0][:, :, :50],
          lambda d, n: pp._soft_nms_rows(d, n, s, 50)[0], case, case,
          ("C-order loop", "untied loop"))  # fmt: skip
    score = jnp.asarray(rng.random((16, 1000), np.float32))

    def first_max_loop(score, top1):
        def step(_, sc):  # 50 selections: the first maximum of each row goes to -inf
            j = top1(sc)
            return jnp.where(jnp.arange(sc.shape[1])[None] == j[:, None], -jnp.inf, sc)

        return lax.fori_loop(0, 50, step, score)

    _pair("first maximum 16 x 1000, 50 times",
          functools.partial(first_max_loop, top1=lambda sc: lax.top_k(sc, 1)[1][:, 0]),
          functools.partial(first_max_loop, top1=lambda sc: pp._top1(sc)[1]),
          (score,), (score,), ("lax.top_k of 1", "max + first index"))  # fmt: skip
    x = jnp.asarray(rng.random((8, 256), np.float32))

    def never(x, ops):
        for k in range(ops):
            x = jnp.sort(x * (k + 1.5), axis=1)
        return x

    def cond_with(x, ops):
        return lax.cond(x[0, 0] < 2, lambda y: y + 1, functools.partial(never, ops=ops), x)

    _pair("cond, branch not taken", functools.partial(cond_with, ops=100),
          functools.partial(cond_with, ops=0), (x,), (x,), ("100 sorts", "empty"))  # fmt: skip


if __name__ == "__main__":
    main()
