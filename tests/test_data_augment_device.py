"""On-device training augmentation (`m2det_jax.data.device_augment`): shapes, the
distributions of its parameters (against the host path where they can be compared), that
pixels and boxes move together, the mirror, identity, no-box and fallback cases, and the
photometric steps (against cv2's uint8 HSV)."""

import functools

import cv2
import jax
import numpy as np

from m2det_jax.data import augment_device as device_augment
from m2det_jax.data import augment_host as augment

B, C, S, G = 256, 64, 32, 4  # batch, input canvas side, output side, box slots
SAMPLE = jax.jit(device_augment.sample_params)
APPLY = jax.jit(functools.partial(device_augment.apply_params, size=S, fill_rgb=(0, 0, 0)))
SAMPLE64 = jax.jit(functools.partial(device_augment.sample_params, mode_draws=64))
AUG = jax.jit(functools.partial(device_augment.augment_batch, size=S, fill_rgb=(123, 117, 104)))


CROP_MODES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)


def make_batch(seed, *, content="noise", max_boxes=G, pad=0):
    """Random canvases (content at the top-left, `pad` elsewhere) and random boxes, slot 0
    always valid. content: "noise", "black" or an int grey level."""
    rng = np.random.default_rng(seed)
    hw = np.stack([rng.integers(24, C + 1, B), rng.integers(24, C + 1, B)], 1).astype(np.int32)
    images = np.full((B, C, C, 3), pad, np.uint8)
    for i, (h, w) in enumerate(hw):
        if content == "noise":
            images[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
        else:
            images[i, :h, :w] = 0 if content == "black" else content
    x1, y1 = rng.uniform(0, 0.7, (2, B, G))
    bw, bh = rng.uniform(0.05, 0.3, (2, B, G))
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1).astype(np.float32)
    valid = rng.uniform(size=(B, G)) < 0.6
    valid[:, 0] = True
    valid[:, max_boxes:] = False
    boxes[~valid] = 0.0
    labels = np.where(valid, rng.integers(1, 21, (B, G)), 0).astype(np.int32)
    return images, hw, boxes, labels, valid


def as_np(tree):
    return jax.tree.map(np.array, tree)  # writable copies


def sample(seed, hw, boxes, valid):
    return as_np(SAMPLE(jax.random.key(seed), hw, boxes, valid))


def identity(params, hw, nearest=False):
    """`params` with no crop, distortion, expand or mirror (bilinear unless nearest)."""
    p = {k: np.array(v) for k, v in params.items()}
    p["crop"] = np.stack([0 * hw[:, 0], 0 * hw[:, 0], hw[:, 1], hw[:, 0]], 1).astype(np.float32)
    p["crop_mode"][:] = np.nan
    p["brightness"][:], p["contrast"][:], p["hue"][:], p["saturation"][:] = 0, 1, 0, 1
    p["expand"][:], p["expand_offset"][:] = 1, 0
    p["mirror"][:], p["nearest"][:] = False, nearest
    return p


def no_photometric(params):
    p = {k: np.array(v) for k, v in params.items()}
    p["brightness"][:], p["contrast"][:], p["hue"][:], p["saturation"][:] = 0, 1, 0, 1
    return p


def resize_ref(images, hw, interpolation=cv2.INTER_LINEAR):
    return np.stack(
        [
            cv2.resize(im[:h, :w], (S, S), interpolation=interpolation)
            for im, (h, w) in zip(images, hw, strict=True)
        ]
    ).astype(np.float32)


def iou_np(box, rect):
    lt, rb = np.maximum(box[:2], rect[:2]), np.minimum(box[2:], rect[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(box) + area(rect) - inter)


def test_shapes_dtypes_ranges_under_jit():
    images, hw, boxes, labels, valid = make_batch(0)
    out = as_np(AUG(jax.random.key(0), images, hw, boxes, labels, valid))
    assert out["image"].shape == (B, S, S, 3) and out["image"].dtype == np.float32
    assert out["boxes"].shape == (B, G, 4) and out["boxes"].dtype == np.float32
    assert out["labels"].dtype == np.int32 and out["valid"].dtype == bool
    assert out["fell_back"].shape == (B,)
    img = out["image"]
    assert img.min() >= 0 and img.max() <= 255 and np.all(img == np.round(img))
    b, v = out["boxes"], out["valid"]
    assert b.min() >= 0 and b.max() <= 1
    assert np.all(b[~v] == 0) and np.all(out["labels"][~v] == 0)
    assert np.all(b[v][:, 2:] > b[v][:, :2])
    assert np.all(out["labels"][v] > 0)
    assert not np.any(v & ~valid)  # slots stay in place: no box appears in an empty slot
    assert v.any(1).all()  # every image keeps a box (or falls back to its own)
    assert 0.2 < (v.sum() / valid.sum()) < 1.0  # some boxes are dropped by the crops


def test_crop_constraint_and_host_distribution():
    keep, area, host_keep, host_area, long_keep = [], [], [], [], []
    rng = np.random.default_rng(1)
    for seed in range(4):
        _, hw, boxes, _, valid = make_batch(10 + seed)
        p = sample(seed, hw, boxes, valid)
        for i in range(B):
            h, w = hw[i]
            px = boxes[i][valid[i]] * np.array([w, h, w, h], np.float32)
            crop, m = p["crop"][i], p["crop_mode"][i]
            assert np.all(crop == np.round(crop))
            assert 0 <= crop[0] < crop[2] <= w and 0 <= crop[1] < crop[3] <= h
            if np.isnan(m):
                np.testing.assert_array_equal(crop, [0, 0, w, h])
            else:
                assert m in (0.1, 0.3, 0.5, 0.7, 0.9) or m == -np.inf
                assert all(iou_np(b, crop) >= np.float32(m) - 1e-6 for b in px)
                ctr = (px[:, :2] + px[:, 2:]) / 2
                assert np.any(np.all((crop[:2] < ctr) & (ctr < crop[2:]), 1))
            keep.append(np.isnan(m))
            area.append((crop[2] - crop[0]) * (crop[3] - crop[1]) / (w * h))
            # The host path on the same image: keep = unchanged size (a crop never is).
            img, _, _ = augment.random_crop(
                np.zeros((h, w, 1), np.uint8), px, np.ones(len(px)), rng
            )
            host_keep.append(img.shape[:2] == (h, w))
            host_area.append(img.shape[0] * img.shape[1] / (w * h))
        # Without the truncation (64 mode draws) the device matches the host's distribution.
        p64 = as_np(SAMPLE64(jax.random.key(seed), hw, boxes, valid))
        long_keep.append(np.isnan(p64["crop_mode"]))
    keep, host_keep, long_keep = np.mean(keep), np.mean(host_keep), np.mean(long_keep)
    assert 0.3 < host_keep < 0.6  # many failed modes here: a sharp comparison
    assert abs(long_keep - host_keep) < 0.07, (long_keep, host_keep)
    assert host_keep - 0.05 < keep < host_keep + 0.12  # truncation only adds keeps
    assert abs(np.mean(area) - np.mean(host_area)) < 0.05, (np.mean(area), np.mean(host_area))


def test_crop_modes_uniform_when_all_succeed():
    """Boxes covering the whole image: every mode (even 0.9) succeeds within 50 trials."""
    _, hw, boxes, _, valid = make_batch(12, max_boxes=1)
    boxes[:, 0] = 0, 0, 1, 1
    modes = np.concatenate([sample(20 + s, hw, boxes, valid)["crop_mode"] for s in range(4)])
    n = len(modes)
    counts = [np.isnan(modes).sum()] + [(modes == np.float32(m)).sum() for m in CROP_MODES[1:]]
    assert sum(counts) == n
    for c in counts:
        assert abs(c / n - 1 / 7) < 4 * np.sqrt(1 / 7 * 6 / 7 / n) + 0.01, counts


def test_parameter_distributions():
    _, hw, boxes, _, valid = make_batch(2)
    valid[B // 2 :] = False  # the second half has no box: identity parameters
    ps = [sample(seed, hw, boxes, valid) for seed in range(4)]
    p = {k: np.concatenate([q[k] for q in ps]) for k in ps[0]}
    hw4 = np.tile(hw, (4, 1))
    has = np.tile(valid.any(1), 4)
    none = identity({k: v[~has] for k, v in p.items()}, hw4[~has], nearest=p["nearest"][~has])
    for k, v in none.items():
        np.testing.assert_array_equal(p[k][~has], v, err_msg=k)
    q = {k: v[has] for k, v in p.items()}
    n = has.sum()
    near = lambda frac, want: abs(frac - want) < 4 * np.sqrt(want * (1 - want) / n)  # noqa: E731
    ws, hs = q["expand"][:, 0], q["expand"][:, 1]
    on = (ws != 1) | (hs != 1)
    assert near(on.mean(), 0.6)
    assert ws.min() >= 1 and hs.min() >= 1
    s2 = ws * hs
    assert s2.max() <= 16 + 1e-3 and s2[on].mean() > 4
    r2 = ws / hs
    assert np.all(r2 >= np.maximum(0.5, 1 / s2) - 1e-4) and np.all(r2 <= np.minimum(2, s2) + 1e-4)
    crop_wh = q["crop"][:, 2:] - q["crop"][:, :2]
    room = np.floor(q["expand"] * crop_wh) - crop_wh
    off = q["expand_offset"]
    assert np.all(off == np.round(off)) and np.all(off >= 0) and np.all(off <= room)
    assert np.all(off[~on] == 0) and (off[on] > 0).mean() > 0.9
    assert near(q["mirror"].mean(), 0.5)
    assert near(p["nearest"].mean(), 0.2)
    for key, ident, lo, hi in (
        ("brightness", 0, -32, 32),
        ("contrast", 1, 0.5, 1.5),
        ("hue", 0, -18, 18),
        ("saturation", 1, 0.5, 1.5),
    ):
        v = q[key]
        assert v.min() >= lo and v.max() <= hi, key
        assert near((v != ident).mean(), 0.5 * (1 - 1 / 37 if key == "hue" else 1)), key
    assert q["hue"].dtype == np.int32 and set(np.unique(q["hue"])) == set(range(-18, 19))


def test_boxes_match_numpy_reference():
    """The box path, step by step in numpy (as the host path does it) from the same params."""
    images, hw, boxes, labels, valid = make_batch(13)
    p = sample(13, hw, boxes, valid)
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))
    for i in range(B):
        h, w = hw[i]
        px = boxes[i] * np.array([w, h, w, h], np.float32)
        crop = p["crop"][i]
        ctr = (px[:, :2] + px[:, 2:]) / 2
        keep = valid[i] & np.all((crop[:2] < ctr) & (ctr < crop[2:]), 1)
        if np.isnan(p["crop_mode"][i]):
            keep = valid[i]
        b = np.concatenate([np.maximum(px[:, :2], crop[:2]), np.minimum(px[:, 2:], crop[2:])], 1)
        b = b - np.tile(crop[:2], 2) + np.tile(p["expand_offset"][i], 2)
        canvas = np.floor(p["expand"][i] * (crop[2:] - crop[:2]))
        b = b / np.tile(canvas, 2)
        if p["mirror"][i]:
            b = np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
        keep &= np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) > 0.01
        if not keep.any():
            assert out["fell_back"][i]
            keep, b = valid[i], boxes[i]
        np.testing.assert_array_equal(out["valid"][i], keep, err_msg=str(i))
        np.testing.assert_allclose(out["boxes"][i][keep], np.clip(b[keep], 0, 1), atol=1e-5)
        np.testing.assert_array_equal(out["labels"][i], np.where(keep, labels[i], 0))
    assert 0.1 < out["valid"].sum() / valid.sum() < 0.95  # boxes are dropped, some kept


def test_pixels_follow_boxes():
    """One white rectangle exactly at the single box: after random crops, expands (black
    fill), mirrors and resizes it is white inside its output box and black well outside."""
    _, hw, boxes, labels, valid = make_batch(3, max_boxes=1)
    rng = np.random.default_rng(3)
    images = np.zeros((B, C, C, 3), np.uint8)
    for i, (h, w) in enumerate(hw):  # integer pixel boxes
        x1, y1 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        x2, y2 = rng.integers(x1 + w // 8 + 1, w + 1), rng.integers(y1 + h // 8 + 1, h + 1)
        images[i, y1:y2, x1:x2] = 255
        boxes[i, 0] = np.array([x1 / w, y1 / h, x2 / w, y2 / h], np.float32)
    p = no_photometric(sample(3, hw, boxes, valid))
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))
    assert out["valid"][:, 0].all()
    crop_wh = p["crop"][:, 2:] - p["crop"][:, :2]
    canvas = np.where(out["fell_back"][:, None], hw[:, ::-1], np.floor(p["expand"] * crop_wh))
    checked = 0
    c = np.arange(S) + 0.5  # output pixel centres
    for i in range(B):
        b = out["boxes"][i, 0] * S
        mx, my = 1 + 1.5 * S / canvas[i]  # margin: > one input pixel and one output pixel
        img = out["image"][i].mean(-1)
        inx, iny = (c > b[0] + mx) & (c < b[2] - mx), (c > b[1] + my) & (c < b[3] - my)
        outx, outy = (c < b[0] - mx) | (c > b[2] + mx), (c < b[1] - my) | (c > b[3] + my)
        assert img[outy[:, None] | outx[None, :]].max(initial=0) < 60, i
        if inx.any() and iny.any():
            checked += 1
            assert img[np.ix_(iny, inx)].min() > 200, i
        # the white area matches the box area (up to the blurred rim)
        white = (img > 127).sum()
        area = (b[2] - b[0]) * (b[3] - b[1])
        assert abs(white - area) <= 2 * (b[2] - b[0] + b[3] - b[1]) + 4, (i, white, area)
    assert checked > B // 2
    assert p["mirror"].any() and (p["expand"] > 1).any() and (~np.isnan(p["crop_mode"])).any()


def test_mirror_flips_image_and_boxes():
    images, hw, boxes, labels, valid = make_batch(4)
    p = sample(4, hw, boxes, valid)
    p["mirror"][:] = False
    a = as_np(APPLY(p, images, hw, boxes, labels, valid))
    p["mirror"][:] = True
    b = as_np(APPLY(p, images, hw, boxes, labels, valid))
    np.testing.assert_array_equal(b["image"], a["image"][:, :, ::-1])
    np.testing.assert_array_equal(b["valid"], a["valid"])
    v = a["valid"]
    np.testing.assert_allclose(b["boxes"][v][:, 0], 1 - a["boxes"][v][:, 2], atol=1e-6)
    np.testing.assert_allclose(b["boxes"][v][:, 2], 1 - a["boxes"][v][:, 0], atol=1e-6)
    np.testing.assert_array_equal(b["boxes"][v][:, 1::2], a["boxes"][v][:, 1::2])


def test_identity_is_plain_resize():
    images, hw, boxes, labels, valid = make_batch(5)
    p = sample(5, hw, boxes, valid)
    out = as_np(APPLY(identity(p, hw), images, hw, boxes, labels, valid))
    diff = np.abs(out["image"] - resize_ref(images, hw))
    assert diff.max() <= 2 and (diff <= 1).mean() >= 0.99
    np.testing.assert_allclose(out["boxes"], boxes, atol=1e-6)
    np.testing.assert_array_equal(out["valid"], valid)
    np.testing.assert_array_equal(out["labels"], labels)
    assert not out["fell_back"].any()
    near = as_np(APPLY(identity(p, hw, nearest=True), images, hw, boxes, labels, valid))
    same = near["image"] == resize_ref(images, hw, cv2.INTER_NEAREST_EXACT)
    assert same.mean() >= 0.99


def test_padding_never_leaks():
    """Black content on a white-padded canvas, black fill: every output pixel stays black."""
    images, hw, boxes, labels, valid = make_batch(6, content="black", pad=255)
    out = as_np(
        APPLY(no_photometric(sample(6, hw, boxes, valid)), images, hw, boxes, labels, valid)
    )
    assert out["image"].max() == 0


def test_image_without_boxes_is_only_resized():
    images, hw, boxes, labels, valid = make_batch(7)
    valid[:] = False
    boxes[:], labels[:] = 0, 0
    out = as_np(AUG(jax.random.key(7), images, hw, boxes, labels, valid))
    p = sample(7, hw, boxes, valid)  # AUG's draws: the interpolation is still drawn
    lin, nst = resize_ref(images, hw), resize_ref(images, hw, cv2.INTER_NEAREST_EXACT)
    want = np.where(p["nearest"][:, None, None, None], nst, lin)
    assert (np.abs(out["image"] - want) <= 1).mean() >= 0.99
    assert 0 < p["nearest"].sum() < B
    assert not out["valid"].any() and not out["fell_back"].any() and not out["boxes"].any()


def test_vanishing_box_falls_back():
    images, hw, boxes, labels, valid = make_batch(8, max_boxes=1)
    boxes[:, 0, 2] = boxes[:, 0, 0] + 0.0015  # < 0.01 wide after any crop (side >= 0.21)
    out = as_np(AUG(jax.random.key(8), images, hw, boxes, labels, valid))
    assert out["fell_back"].all()
    np.testing.assert_array_equal(out["valid"], valid)
    np.testing.assert_allclose(out["boxes"], boxes, atol=1e-7)
    np.testing.assert_array_equal(out["labels"], labels)
    assert (np.abs(out["image"] - resize_ref(images, hw)) <= 1).mean() >= 0.99


def test_determinism():
    images, hw, boxes, labels, valid = make_batch(9)
    a = as_np(AUG(jax.random.key(1), images, hw, boxes, labels, valid))
    b = as_np(AUG(jax.random.key(1), images, hw, boxes, labels, valid))
    c = as_np(AUG(jax.random.key(2), images, hw, boxes, labels, valid))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (a["image"] != c["image"]).any(axis=(1, 2, 3)).mean() > 0.9
    assert not np.array_equal(a["boxes"], c["boxes"])


def test_brightness_contrast_truncate_and_skip_the_fill():
    images, hw, boxes, labels, valid = make_batch(10, content=101)
    p = identity(sample(10, hw, boxes, valid), hw)
    p["brightness"][:] = 20.5
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))
    np.testing.assert_array_equal(out["image"], 121)  # floor(101 + 20.5)
    p["brightness"][:], p["contrast"][:] = 0, 1.5
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))
    np.testing.assert_array_equal(out["image"], 151)  # floor(151.5)
    p["contrast"][:], p["brightness"][:] = 1, -200
    np.testing.assert_array_equal(as_np(APPLY(p, images, hw, boxes, labels, valid))["image"], 0)
    # Expanded: the image part is brightened, the (black) fill is not.
    p["brightness"][:] = 20
    p["expand"][:] = 4.0, 1.0
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))["image"][..., 0]
    assert set(np.unique(out)) <= {0.0, 121.0} | set(np.arange(1.0, 121.0))
    assert ((out == 0).mean(axis=(1, 2)) > 0.5).all() and (
        (out == 121).mean(axis=(1, 2)) > 0.15
    ).all()


def test_hue_saturation_match_cv2():
    """Constant-colour images through hue and saturation vs cv2's uint8 HSV round trip."""
    rng = np.random.default_rng(11)
    colours = rng.integers(0, 256, (B, 3)).astype(np.uint8)
    images, hw, boxes, labels, valid = make_batch(11)
    images[:] = colours[:, None, None]
    p = identity(sample(11, hw, boxes, valid), hw)
    p["hue"][:] = rng.integers(-18, 19, B)
    p["saturation"][:] = rng.uniform(0.5, 1.5, B)
    p["hue"][: B // 4] = 0  # saturation only
    p["saturation"][B // 4 : B // 2] = 1  # hue only
    out = as_np(APPLY(p, images, hw, boxes, labels, valid))["image"]
    assert (out == out[:, :1, :1]).all()
    hsv = cv2.cvtColor(colours[None], cv2.COLOR_RGB2HSV)[0].astype(np.float32)
    hsv[:, 0] = (hsv[:, 0] + p["hue"]) % 180
    hsv[:, 1] = np.clip(hsv[:, 1] * p["saturation"], 0, 255)
    want = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)
    diff = np.abs(out[:, 0, 0] - want)
    assert diff.max() <= 8 and (diff <= 2).mean() >= 0.95, (diff.max(), (diff <= 2).mean())
    assert np.abs(out[:, 0, 0] - colours).max() > 30  # the distortion did something
