"""Speed of `m2det_jax.detect` vs a plain numpy per-class loop (batch 1, CPU).

    python benchmarks/postprocess_bench.py [--repeats 5] [--sizes 320 512] [--malloc kept]

For 81 classes and the priors of input 320 (12,810) and 512 (32,760), on three kinds of
synthetic network output:
  * typical: background wins almost everywhere; a few objects, each a cluster of confident
    priors of one class (a few hundred candidates over a few classes);
  * crowded: 15 objects, large clusters, noisy logits (thousands of candidates spread over
    most classes);
  * dense: every prior has 7 classes at ~0.14 (the worst case: every class has more
    candidates than candidates_per_class).
and for the original-compatible preset (linear soft-NMS, +1 IoU, no per-image cap) and the
standard preset (`standard_postprocess`: IoU without +1, 100 per image).

Columns:
  jax       jitted `detect` on inputs already on the device (the network's outputs),
            compile excluded, median of --repeats and at least 1 s of calls; `layout`
            is the static layout it ran (`postprocess.layout_index` into
            `postprocess.layouts.static_layouts`: fast / sparse / tiered / plain).
  np full   the original algorithm in numpy: per-class Python loop, the C soft-NMS loop
            (each step vectorised in numpy) run to the end, no candidate cap. This is
            what the original's nms_process computes; the original runs the soft-NMS loop
            in Cython, which beats this numpy port when a class has thousands of
            candidates (O(N^2) scalar work vs N numpy steps), so "x full" overstates the
            gain over the original there.
  np 50     the same numpy loop with `detect`'s shortcuts: candidates_per_class cap and
            stop after keep_per_class selections (rows after that are discarded);
            median of --repeats and at least 1 s (at most 5 s) of calls.
"np full" is the median of up to --full-repeats runs (fewer once 5 s are spent: the dense
case takes seconds). The three sides of a row run interleaved, in slices of ~0.2 s round
robin, so that they share the machine's slow and fast phases (this 2-core machine is
noisy: a block of seconds of one side alone can land in a phase the other never sees).
`--malloc kept` calls `m2det_jax.perf.runtime.keep_freed_memory()` first (glibc keeps freed
memory for reuse instead of unmapping it), for both sides; the default leaves the
allocator as it is.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from m2det_jax.config import default_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference import postprocess
from m2det_jax.inference.postprocess import layouts
from m2det_jax.perf import runtime

F32 = np.float32


# ---------------------------------------------------------------- numpy reference loop
def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _decode(loc, priors, variance, hw):
    c = priors[:, :2] + loc[:, :2] * F32(variance[0]) * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * F32(variance[1]))
    x1 = c - wh / 2
    return np.concatenate([x1, x1 + wh], 1) * np.array([hw[1], hw[0], hw[1], hw[0]], F32)


def _soft_nms_np(dets, p, max_steps=None):
    """The original's C soft-NMS loop on dets [N, 5] in place, each step in numpy."""
    one, n, i = F32(p.pixel_offset), len(dets), 0
    gaussian = p.method == "soft_gaussian"
    while i < n and (max_steps is None or i < max_steps):
        j = i + int(np.argmax(dets[i:n, 4]))
        dets[[i, j]] = dets[[j, i]]
        t, rest = dets[i], dets[i + 1 : n]
        iw = np.minimum(t[2], rest[:, 2]) - np.maximum(t[0], rest[:, 0]) + one
        ih = np.minimum(t[3], rest[:, 3]) - np.maximum(t[1], rest[:, 1]) + one
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)
        area = (rest[:, 2] - rest[:, 0] + one) * (rest[:, 3] - rest[:, 1] + one)
        ov = inter / ((t[2] - t[0] + one) * (t[3] - t[1] + one) + area - inter)
        hit = (iw > 0) & (ih > 0)
        if gaussian:
            w = np.exp(-(ov * ov) / F32(p.sigma)).astype(F32)
        else:
            w = np.where(ov > F32(p.iou_threshold), F32(1) - ov, F32(1))
        rest[:, 4] = np.where(hit, w * rest[:, 4], rest[:, 4])
        bad = hit & (rest[:, 4] < F32(p.min_score))
        if bad.any():  # the C loop's swap-with-last removal, in one go
            m = int((~bad).sum())
            lb = np.nonzero(bad[:m])[0]
            rg = m + np.nonzero(~bad[m:])[0][::-1]
            rest[lb] = rest[rg]
            n = i + 1 + m
        i += 1
    return n


def _hard_nms_np(dets, p, max_keep=None):
    """Greedy NMS in the original's order: `argsort()[::-1]`, the later of tied rows first."""
    order = np.argsort(dets[:, 4], kind="stable")[::-1]
    one, alive, keep = F32(p.pixel_offset), np.ones(len(dets), bool), []
    area = (dets[:, 2] - dets[:, 0] + one) * (dets[:, 3] - dets[:, 1] + one)
    for i in order:
        if not alive[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        t = dets[i]
        iw = np.maximum(np.minimum(t[2], dets[:, 2]) - np.maximum(t[0], dets[:, 0]) + one, 0)
        ih = np.maximum(np.minimum(t[3], dets[:, 3]) - np.maximum(t[1], dets[:, 1]) + one, 0)
        inter = iw * ih
        alive &= ~(inter / (area[i] + area - inter) > F32(p.iou_threshold))
    return keep


def numpy_detect(loc, logits, priors, hw, p, variance, shortcuts: bool):
    """One image: the original's Detect + nms_process, as a per-class numpy loop."""
    scores = _softmax(logits)
    boxes = _decode(loc, priors, variance, hw)
    out = []
    for j in range(1, scores.shape[1]):
        inds = np.nonzero(scores[:, j] > F32(p.score_threshold))[0]
        if shortcuts and len(inds) > p.candidates_per_class:
            top = np.argsort(-scores[inds, j], kind="stable")[: p.candidates_per_class]
            inds = np.sort(inds[top])
        if len(inds) == 0:
            out.append(np.zeros((0, 5), F32))
            continue
        dets = np.hstack([boxes[inds], scores[inds, j][:, None]]).astype(F32)
        steps = p.keep_per_class if shortcuts else None
        if p.method == "hard":
            keep = _hard_nms_np(dets, p, steps)
        else:
            keep = list(range(_soft_nms_np(dets, p, steps)))
        out.append(dets[keep[: p.keep_per_class]])
    if p.max_per_image > 0:
        all_scores = np.concatenate([d[:, 4] for d in out])
        if len(all_scores) > p.max_per_image:
            th = np.sort(all_scores)[-p.max_per_image]
            out = [d[d[:, 4] >= th] for d in out]
    return out


# ---------------------------------------------------------------- synthetic outputs
def make_logits(kind: str, priors: np.ndarray, num_classes: int, rng) -> np.ndarray:
    p = len(priors)
    if kind == "dense":
        logits = np.zeros((p, num_classes), F32)
        cls = np.argsort(rng.random((p, num_classes - 1)), 1)[:, :7] + 1
        np.put_along_axis(logits, cls, 5.0 + rng.uniform(0, 0.1, cls.shape).astype(F32), 1)
        return logits
    crowded = kind == "crowded"
    logits = rng.standard_normal((p, num_classes)).astype(F32) * (1.0 if crowded else 0.5)
    logits[:, 0] += 4.0 if crowded else 6.0
    for _ in range(15 if crowded else 5):
        c = rng.integers(1, num_classes)
        ctr = rng.uniform(0.15, 0.85, 2)
        size = rng.uniform(0.1, 0.4)
        near = (np.abs(priors[:, :2] - ctr).max(1) < (0.08 if crowded else 0.03)) & (
            np.abs(np.log(priors[:, 2] / size)) < (1.5 if crowded else 0.7)
        )
        logits[near, c] += rng.uniform(5, 9, near.sum()).astype(F32)
    return logits


class _Timer:
    """Per-call timings of one side, collected in slices so that sides share the machine's
    slow and fast phases (this 2-core machine is noisy): `done` once it has at least
    `repeats` calls and `min_s` seconds of them, or after `budget_s` seconds."""

    def __init__(self, fn, repeats, min_s=0.0, budget_s=None):
        self.fn, self.repeats, self.min_s, self.budget_s = fn, repeats, min_s, budget_s
        self.ts: list[float] = []

    def done(self):
        spent = sum(self.ts)
        if self.budget_s is not None and spent > self.budget_s:
            return True
        return len(self.ts) >= self.repeats and spent >= self.min_s

    def run_slice(self, slice_s=0.2):
        t_end = time.perf_counter() + slice_s
        while not self.done():
            t0 = time.perf_counter()
            self.fn()
            t1 = time.perf_counter()
            self.ts.append(t1 - t0)
            if t1 >= t_end:
                break

    def median_ms(self):
        return 1000 * float(np.median(self.ts))


def _interleaved(timers):
    """Runs the timers slice by slice, round robin, until all are done."""
    while not all(t.done() for t in timers):
        for t in timers:
            t.run_slice()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    ap.add_argument("--kinds", nargs="+", default=["typical", "crowded", "dense"])
    ap.add_argument("--full-repeats", type=int, default=5,
                    help="repeats of 'np full' (fewer once 5 s are spent)")
    ap.add_argument("--malloc", choices=("default", "kept"), default="default",
                    help="kept: glibc keeps freed memory "
                         "(m2det_jax.perf.runtime.keep_freed_memory)")
    args = ap.parse_args()
    malloc = args.malloc
    if malloc == "kept" and not runtime.keep_freed_memory():
        malloc = "default (keep_freed_memory unavailable: not glibc)"
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({runtime.cpu_model()}), "
        f"batch 1, 81 classes, malloc {malloc}"
    )
    header = (
        f"{'size':>4} {'priors':>6} {'case':>8} {'preset':>8} {'cands':>6} {'maxcls':>6} "
        f"{'layout':>22} {'jax ms':>8} {'np full ms':>10} {'np 50 ms':>9} {'x full':>7} "
        f"{'x 50':>6}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for size in args.sizes:
        cfg = default_config()
        cfg.model.input_size = size
        priors = prior_boxes(cfg)
        hw = np.array([480.0, 640.0], F32)
        for kind in args.kinds:
            logits = make_logits(kind, priors, 81, rng)
            loc = (rng.standard_normal((len(priors), 4)) * 0.3).astype(F32)
            above = _softmax(logits)[:, 1:] > F32(cfg.postprocess.score_threshold)
            presets = (("original", cfg), ("standard", postprocess.standard_postprocess(cfg)))
            for preset, c in presets:
                p = c.postprocess
                fn = postprocess.make_detect_fn(c)
                # On the device already, as the network's outputs are in eval/detect.
                inputs = tuple(jax.device_put(a) for a in (loc[None], logits[None], priors,
                                                          hw[None]))  # fmt: skip
                jax.block_until_ready(fn(*inputs))  # compile
                np_args = (loc, logits, priors, hw, p, tuple(c.anchors.variance))
                timers = (
                    _Timer(functools.partial(lambda f, a: jax.block_until_ready(f(*a)), fn,
                                             inputs), args.repeats, min_s=1.0),
                    _Timer(functools.partial(numpy_detect, *np_args, False), args.full_repeats,
                           budget_s=5.0),
                    _Timer(functools.partial(numpy_detect, *np_args, True), args.repeats,
                           min_s=1.0, budget_s=5.0),
                )  # fmt: skip
                _interleaved(timers)
                t_jax, t_full, t_50 = (t.median_ms() for t in timers)
                static = layouts.static_layouts(
                    80,
                    len(priors),
                    p.candidates_per_class,
                    postprocess.PostprocessSettings.from_config(c),
                )
                u, tiers = static[postprocess.layout_index(logits[None], c)]
                lay = f"{u}:" + "+".join(f"{r}x{k}" for r, k in tiers)
                print(
                    f"{size:>4} {len(priors):>6} {kind:>8} {preset:>8} {int(above.sum()):>6} "
                    f"{int(above.sum(0).max()):>6} {lay:>22} {t_jax:>8.2f} {t_full:>10.1f} "
                    f"{t_50:>9.1f} "
                    f"{t_full / t_jax:>6.1f}x {t_50 / t_jax:>5.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
