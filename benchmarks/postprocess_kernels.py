"""The XLA:CPU facts `m2det_jax.postprocess` is built on, measured side by side.

    python benchmarks/postprocess_kernels.py [--min-s 1.0] [--part all|kernels|layouts]

Every speed-only piece of the package against the plain code it replaces, and the
primitive facts behind the plain code's own form. Prints the CPU model, then:
  * the temporary memory of the compiled `detect` at 320 and 512 px (batch 1, 81 classes):
    above glibc's 32 MiB mmap threshold every call page-faults its temporaries afresh;
  * a gather from a [6, 8, 256] buffer with the default (clamp-and-mask) index mode vs
    `promise_in_bounds` (`postprocess.arrays.IN_BOUNDS`);
  * sorting 80 x 1000 (prior, score) pairs as a (key, value) sort (`plain.candidates`) vs
    one packed int32 key (`tasks.select_candidates`);
  * the soft-NMS loop (50 selections, clustered boxes) on 8 x 128 vs 8 x 256 buffers (why
    the fast layouts step from 64 to 128 candidates);
  * the C-order soft-NMS loop (`loops.soft_nms_rows`) vs `untied.soft_nms_rows` (the
    untied loop, the C-order one only on ties), 50 selections on 16 x 1000;
  * the first maximum of each row of 16 x 1000 (50 times in a loop): `jnp.argmax` vs
    `loops.first_max` (a max, then the least index at it), and, with a count of the ties,
    `lax.top_k` of 2 vs `untied.top1`;
  * what code that never runs costs each call: a cond taking a trivial branch, its other
    branch 0 or 100 sorts (XLA:CPU sets up every buffer of the program per call);
  * `detect` at 320 px (12,810 priors, 81 classes, batch 1) on a batch that runs each
    layout of `postprocess.layouts`: with every layout vs without that layout (the
    settings knob that removes it; the next exact layout runs instead), and the plain
    implementation (`fast=False`) vs the fast path on a typical, a crowded and a dense
    batch.
Each timing is the median of at least --min-s seconds of calls; the pairs run interleaved.
`--malloc kept` calls `m2det_jax.perf.runtime.keep_freed_memory()` first (glibc keeps freed
memory instead of unmapping it, for both sides of every pair): XLA:CPU allocates each
call's temporaries afresh, and above glibc's mmap threshold every touched page faults, so
the dense and crowded rows depend on the allocator's state by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2det_jax.config import default_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference import postprocess as pp
from m2det_jax.inference.postprocess import layouts, loops, plain, scoring, untied
from m2det_jax.perf import runtime

F32 = np.float32


def _pair(name, fa, fb, args_a, args_b, labels, min_s=1.0, jit=True):
    """Median us of two functions, interleaved for at least min_s each."""
    if jit:
        fa, fb = jax.jit(fa), jax.jit(fb)
    jax.block_until_ready((fa(*args_a), fb(*args_b)))
    ta, tb = [], []
    while sum(ta) < min_s or sum(tb) < min_s:
        for f, a, ts in ((fa, args_a, ta), (fb, args_b, tb)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
    a_us, b_us = 1e6 * np.median(ta), 1e6 * np.median(tb)
    print(f"{name:<44} {labels[0]:>24} {a_us:9.1f} us   {labels[1]:>24} {b_us:9.1f} us"
          f"   {a_us / b_us:5.1f}x", flush=True)  # fmt: skip


def _soft_nms_case(rng, nt, kb):
    c = 200 + 60 * rng.uniform(-1, 1, (nt, kb, 2))
    wh = rng.uniform(40, 80, (nt, kb, 2))
    cols = (c[..., 0] - wh[..., 0] / 2, c[..., 1] - wh[..., 1] / 2,
            c[..., 0] + wh[..., 0] / 2, c[..., 1] + wh[..., 1] / 2,
            rng.uniform(0.1, 1.0, (nt, kb)))  # fmt: skip
    d = loops.stack_buffer(tuple(jnp.asarray(x, jnp.float32) for x in cols), 1)
    return d, jnp.full((nt,), 100, jnp.int32)


def kernels(rng, min_s):
    for size in (320, 512):
        cfg = default_config()
        cfg.model.input_size = size
        p = len(prior_boxes(cfg))
        shapes = [(1, p, 4), (1, p, 81), (p, 4), (1, 2)]
        fn = pp.make_detect_fn(cfg)
        compiled = fn.lower(*(jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"detect temporaries at {size} px ({p} priors): {temp / 2**20:.1f} MiB "
              f"(glibc mmap threshold: 32 MiB)")  # fmt: skip
    pair = functools.partial(_pair, min_s=min_s)
    d = jnp.asarray(rng.random((6, 8, 256), np.float32))
    src = jnp.asarray(rng.integers(0, 256, (8, 256)).astype(np.int32))

    def gather(d, i, mode):
        return jnp.take_along_axis(d, jnp.broadcast_to(i[None], d.shape), axis=2, mode=mode)

    pair("gather [6, 8, 256]", functools.partial(gather, mode=None),
         functools.partial(gather, mode="promise_in_bounds"), (d, src), (d, src),
         ("default mode", "promise_in_bounds"))  # fmt: skip
    idx = jnp.asarray(rng.integers(0, 30000, (80, 1000)).astype(np.int32))
    vals = jnp.asarray(rng.random((80, 1000), np.float32))

    def packed(i, v):
        key = jnp.sort(i * 1000 + jnp.arange(1000, dtype=i.dtype), axis=1)
        return key // 1000, jnp.take_along_axis(v, key % 1000, axis=1)

    pair("sort 80 x 1000 by prior", lambda i, v: lax.sort((i, v), dimension=1, num_keys=1),
         packed, (idx, vals), (idx, vals), ("(key, value) sort", "packed int32 key"))  # fmt: skip
    s = pp.PostprocessSettings.from_config(default_config())
    loop = lambda d, n: loops.soft_nms(d, n, s, 50)  # noqa: E731
    pair("soft-NMS, 50 selections", loop, loop, _soft_nms_case(rng, 8, 256),
         _soft_nms_case(rng, 8, 128), ("8 x 256", "8 x 128"))  # fmt: skip
    case = _soft_nms_case(rng, 16, 1000)
    pair("soft-NMS 16 x 1000, 50 selections", lambda d, n: loops.soft_nms_rows(d, n, s, 50)[0],
         lambda d, n: untied.soft_nms_rows(d, n, s, 50)[0], case, case,
         ("C-order loop", "untied loop"))  # fmt: skip
    score = jnp.asarray(rng.random((16, 1000), np.float32))
    live = jnp.ones((16, 1000), bool)

    def first_max_loop(score, top1):
        def step(_, st):  # 50 selections: the first maximum of each row goes to -inf
            sc, tied = st
            j, tie = top1(sc)
            hit = jnp.arange(sc.shape[1])[None] == j[:, None]
            return jnp.where(hit, -jnp.inf, sc), tied | tie

        return lax.fori_loop(0, 50, step, (score, jnp.zeros(score.shape[0], bool)))

    def top2(sc):  # the first maximum, and whether it is tied
        v, i = lax.top_k(sc, 2)
        return i[:, 0], v[:, 0] == v[:, 1]

    def top1(sc):
        _, j, count = untied.top1(sc)
        return j, count > 1

    def no_ties(first):
        return lambda sc: (first(sc), jnp.zeros(sc.shape[0], bool))

    pair("first maximum 16 x 1000, 50 times",
         functools.partial(first_max_loop, top1=no_ties(lambda sc: jnp.argmax(sc, axis=1))),
         functools.partial(first_max_loop, top1=no_ties(lambda sc: loops.first_max(sc, live))),
         (score,), (score,), ("jnp.argmax", "loops.first_max"))  # fmt: skip
    pair("first maximum + ties, 50 times", functools.partial(first_max_loop, top1=top2),
         functools.partial(first_max_loop, top1=top1), (score,), (score,),
         ("lax.top_k of 2", "untied.top1"))  # fmt: skip
    x = jnp.asarray(rng.random((8, 256), np.float32))

    def never(x, ops):
        for k in range(ops):
            x = jnp.sort(x * (k + 1.5), axis=1)
        return x

    def cond_with(x, ops):
        return lax.cond(x[0, 0] < 2, lambda y: y + 1, functools.partial(never, ops=ops), x)

    pair("cond, branch not taken", functools.partial(cond_with, ops=100),
         functools.partial(cond_with, ops=0), (x,), (x,), ("100 sorts", "empty"))  # fmt: skip


def layout_logits(rng, num_priors, counts, span, ties=True):
    """Logits [1, P, 81]: background wins everywhere except `counts[j]` priors of class
    j + 1, a window of the first `span` priors (windows spread evenly, so that a prior
    holds at most ~8 classes and each of them scores > 0.1). With `ties`, equal rows tie
    exactly (then soft-NMS runs the untied loop and the C-order one); else the logits of a
    class are distinct (and its scores practically never tie)."""
    logits = np.zeros((1, num_priors, 81), F32)
    logits[..., 0] = 5.0
    for j, n in enumerate(counts):
        pick = (j * span // len(counts) + np.arange(n)) % span
        jitter = 0.1 * rng.integers(0, 2, n) if ties else 1e-4 * rng.permutation(n)
        logits[0, pick, j + 1] = 8.0 + 0.01 * j + jitter
    return logits


# name: (candidates per class, prior span, the knob that removes the layout)
LAYOUT_ROWS = {
    "fast": ([40] * 5, 256, {"fast_classes": 0}),
    "fast x2": ([100, 40, 40], 256, {"fast_classes": 0}),
    "sparse 256 tiered": ([100] * 12, 256, {"tier_classes": 0}),
    "sparse 256 all": ([100] * 20, 256, {"fast_priors": 512}),
    "sparse 512": ([150] * 12, 500, {"sparse_priors": 256}),
    "sparse 512 all": ([150] * 20, 500, {"sparse_priors": 256}),
    "all priors tiered": ([800] * 16 + [50] * 30, 12810, {"tier_classes": 0}),
    "plain layout, dense": ([800] * 40, 12810, {"fast": False}),
}


@functools.partial(jax.jit, static_argnums=4)
def tied_tasks(loc, logits, priors, hw, s):
    """How many classes of a batch see a tied maximum in the untied soft-NMS loop (any
    makes the C-order loop redo the batch), on the plain path's candidate buffers."""
    scorer = scoring.LogitScorer(loc, logits, priors, hw, s.variance)
    boxes, scores = scorer.boxes(), scorer.scores()
    cls = jnp.swapaxes(scores[:, :, 1:], 1, 2)
    above = cls > s.score_threshold
    counts = jnp.sum(above, axis=2, dtype=jnp.int32)
    kc = min(s.candidates_per_class, boxes.shape[1])
    idx, vals, n = plain.candidates(jnp.where(above, cls, -1.0), counts, kc)
    bx = boxes[0][jnp.minimum(idx, boxes.shape[1] - 1)]
    d = loops.stack_buffer((bx[..., 0], bx[..., 1], bx[..., 2], bx[..., 3], vals), 1)
    return jnp.sum(untied.soft_nms_untied(d, n, s, s.keep_per_class)[3])


def layout_rows(rng, min_s):
    """detect at 320 px with every layout vs without the one the batch runs."""
    cfg = default_config()
    priors = jnp.asarray(prior_boxes(cfg))
    p = priors.shape[0]
    full = pp.PostprocessSettings.from_config(cfg)
    names = ["fast", "fast x2", "sparse 256 tiered", "sparse 256 all", "sparse 512",
             "sparse 512 all", "all priors tiered", "plain layout"]  # fmt: skip
    static = layouts.static_layouts(80, p, 1000, full)
    hw = jnp.asarray([[480.0, 640.0]])
    for i, (row, (counts, span, knob)) in enumerate(LAYOUT_ROWS.items()):
        logits = jnp.asarray(layout_logits(rng, p, counts, span))
        loc = jnp.asarray((rng.standard_normal((1, p, 4)) * 0.3).astype(F32))
        without = dataclasses.replace(full, **knob)
        assert pp.layout_index(logits, full) == i, (row, pp.layout_index(logits, full))
        alt = pp.layout_index(logits, without)
        alt_layout = layouts.static_layouts(80, p, 1000, without)[alt]
        alt_name = names[static.index(alt_layout)] if without.fast else "plain impl."
        args = (loc, logits, priors, hw)
        labels = (f"without: {alt_name}", f"with: {names[i]}")
        if "dense" in row:
            row += f" ({int(tied_tasks(*args, full))} tied)"
        _pair(f"detect 320 px, {row}", pp.make_detect_fn(without), pp.make_detect_fn(full),
              args, args, labels, min_s, jit=False)  # fmt: skip
    kinds = {
        "typical": ([40] * 5, 256, True),
        "crowded": ([800] * 16 + [50] * 30, p, True),
        "dense, no exact ties": ([800] * 40, p, False),
    }
    for kind, (counts, span, ties) in kinds.items():
        logits = jnp.asarray(layout_logits(rng, p, counts, span, ties))
        loc = jnp.asarray((rng.standard_normal((1, p, 4)) * 0.3).astype(F32))
        args = (loc, logits, priors, hw)
        if kind.startswith("dense"):
            kind += f" ({int(tied_tasks(*args, full))} tied)"
        _pair(f"detect 320 px, {kind}", pp.make_detect_fn(dataclasses.replace(full, fast=False)),
              pp.make_detect_fn(full), args, args, ("plain implementation", "fast path"), min_s,
              jit=False)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-s", type=float, default=1.0, help="seconds of calls per side")
    ap.add_argument("--part", choices=("all", "kernels", "layouts"), default="all",
                    help="print only the kernel rows or only the detect rows")  # fmt: skip
    ap.add_argument("--malloc", choices=("default", "kept"), default="default",
                    help="kept: glibc keeps freed memory (runtime.keep_freed_memory)")  # fmt: skip
    args = ap.parse_args()
    malloc = args.malloc
    if malloc == "kept" and not runtime.keep_freed_memory():
        malloc = "default (keep_freed_memory unavailable: not glibc)"
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, CPU: {runtime.cpu_model()}, "
          f"malloc {malloc}")  # fmt: skip
    rng = np.random.default_rng(0)
    if args.part in ("all", "kernels"):
        kernels(rng, args.min_s)
    if args.part in ("all", "layouts"):
        layout_rows(np.random.default_rng(1), args.min_s)


if __name__ == "__main__":
    main()
