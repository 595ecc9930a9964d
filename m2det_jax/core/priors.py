"""Prior (anchor) boxes and feature-map geometry; a leaf module (imports nothing of ours).

Bit-identical to the original's PriorBox for the shipped sizes (docs/original.md §2).
Order: scales from the largest map to the smallest, then rows (y), then columns (x), then
6 anchors per location: (s, s), (s', s'), ar2 wide, ar2 tall, ar3 wide, ar3 tall. Output
is center form (cx, cy, w, h), normalized, clamped to [0, 1] as a whole.

The functions take the config (`cfg.model`, `cfg.anchors`) but never import the config
module: `config.checks.validate` calls them to check the geometry of a config.
"""

from __future__ import annotations

import math

import numpy as np

# size_pattern per shipped input size, as the original configs write it; other sizes (or
# num_scales != 6) use the ladder of `resolve_size_pattern`.
SIZE_PATTERNS = {
    320: (0.08, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
    512: (0.06, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
    704: (0.04, 0.11, 0.23, 0.39, 0.58, 0.80, 1.05),
    800: (0.04, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
}
# steps per shipped input size, as written in the original configs (not input/feature-map).
STEPS = {
    320: (8, 16, 32, 64, 107, 320),
    512: (8, 16, 32, 64, 128, 256),
    704: (8, 16, 32, 64, 117, 176),
    800: (8, 16, 32, 62, 115, 160),
}


def _down(n: int) -> int:
    """Output size of a 3x3/2x2 stride-2 op with 'ceil' halving (conv s2 p1, ceil pool)."""
    return (n - 1) // 2 + 1


def backbone_tap_sizes(backbone: str, input_size: int, resnet_layer3_stride: int = 1):
    """(shallow, deep) spatial sizes of the two backbone taps for a square input."""
    n = int(input_size)
    if backbone == "vgg16":
        shallow = _down(n // 2 // 2)  # pool1, pool2 floor; pool3 ceil_mode
        deep = shallow // 2  # pool4 floor; pool5 3x3 s1 and conv6/7 keep the size
    else:
        shallow = _down(_down(_down(n)))  # conv1 s2, maxpool s2, layer2 s2
        mid = _down(shallow) if resnet_layer3_stride == 2 else shallow
        deep = _down(mid)  # layer4 s2
    return shallow, deep


def feature_map_sizes(cfg) -> list[int]:
    """Side lengths of the num_scales TUM outputs, largest first (= prior feature maps).

    Raises:
      ValueError: if the TUM cannot be built for this input size.
    """
    m = cfg.model
    shallow, deep = backbone_tap_sizes(m.backbone, m.input_size, m.resnet_layer3_stride)
    if deep < 1:
        raise ValueError(f"model.input_size={m.input_size} is too small for the backbone")
    sizes = [shallow]
    for _ in range(m.num_scales - 2):
        sizes.append(_down(sizes[-1]))
    if sizes[-1] < 3:
        raise ValueError(
            f"model.input_size={m.input_size} with model.num_scales={m.num_scales}: the TUM's "
            f"last (3x3, pad 0) encoder layer sees a {sizes[-1]}x{sizes[-1]} map and needs "
            f">= 3x3; use a larger input_size or fewer num_scales"
        )
    sizes.append(sizes[-1] - 2)
    return sizes


def resolve_size_pattern(cfg) -> tuple[float, ...]:
    """size_pattern (num_scales + 1 fractions of the input size) for `cfg`."""
    m = cfg.model
    if cfg.anchors.size_pattern is not None:
        sp = tuple(float(v) for v in cfg.anchors.size_pattern)
    elif m.input_size in SIZE_PATTERNS and m.num_scales == 6:
        sp = SIZE_PATTERNS[m.input_size]
    else:
        # The 320/512 spacing generalised: 0.08 first, then an even ladder from 0.15 to
        # 0.87 over the remaining scales, plus one step past the end for max_sizes.
        n = m.num_scales - 1
        lo, hi = 0.15, 0.87
        step = (hi - lo) / max(n - 1, 1)
        ladder = [lo + i * step for i in range(n)]
        sp = (0.08, *ladder, ladder[-1] + step)
    if len(sp) != m.num_scales + 1:
        raise ValueError(
            f"anchors.size_pattern has {len(sp)} entries; model.num_scales={m.num_scales} "
            f"needs {m.num_scales + 1}"
        )
    return sp


def resolve_steps(cfg) -> tuple[float, ...]:
    """Per-scale strides in pixels: the config's, the original's, or input/feature-map."""
    m = cfg.model
    fm = feature_map_sizes(cfg)
    if cfg.anchors.steps is not None:
        return tuple(cfg.anchors.steps)
    if m.input_size in STEPS and m.num_scales == 6:
        return STEPS[m.input_size]
    return tuple(m.input_size / f for f in fm)


def prior_boxes(cfg) -> np.ndarray:
    """Priors of `cfg`: float32 [P, 4] (cx, cy, w, h), the original's order and rounding."""
    size = cfg.model.input_size
    fm = feature_map_sizes(cfg)
    steps = resolve_steps(cfg)
    sp = resolve_size_pattern(cfg)
    # As the original's anchor helper: pixel sizes rounded to 2 decimals, in doubles.
    min_sizes = [round(sp[k] * size, 2) for k in range(len(fm))]
    max_sizes = [round(sp[k + 1] * size, 2) for k in range(len(fm))]
    ars = [float(a) for a in cfg.anchors.aspect_ratios]
    out = []
    for k, f in enumerate(fm):
        f_k = size / steps[k]
        idx = np.arange(f, dtype=np.float64)
        cy, cx = np.meshgrid((idx + 0.5) / f_k, (idx + 0.5) / f_k, indexing="ij")
        s_k = min_sizes[k] / size
        s_kp = math.sqrt(s_k * (max_sizes[k] / size))
        whs = [(s_k, s_k), (s_kp, s_kp)]
        for ar in ars:
            r = math.sqrt(ar)
            whs += [(s_k * r, s_k / r), (s_k / r, s_k * r)]
        a = len(whs)
        boxes = np.empty((f, f, a, 4), np.float64)  # [H, W, A, 4]
        boxes[..., 0] = cx[:, :, None]
        boxes[..., 1] = cy[:, :, None]
        boxes[..., 2] = np.array([w for w, _ in whs])
        boxes[..., 3] = np.array([h for _, h in whs])
        out.append(boxes.reshape(-1, 4))
    priors = np.concatenate(out).astype(np.float32)
    if cfg.anchors.clip:
        np.clip(priors, 0.0, 1.0, out=priors)
    return priors


def num_anchors(cfg) -> int:
    """Anchors per location: 2 squares + 2 per aspect ratio."""
    return 2 + 2 * len(cfg.anchors.aspect_ratios)
