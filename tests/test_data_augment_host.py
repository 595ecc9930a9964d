"""Augmentation (crop, expand, mirror, photometric, min-size fallback) and eval preprocessing."""

from __future__ import annotations

import cv2
import numpy as np

from m2det_jax.core.preprocess import normalize
from m2det_jax.data import augment_host as augment


def _rect_image(h=60, w=80, box=(20, 10, 50, 40)):
    img = np.full((h, w, 3), 90, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (255, 0, 0)
    return img, np.array([box], np.float32)


def _red_bbox(img):
    ys, xs = np.nonzero((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_crop_expand_mirror_boxes_follow_the_pixels():
    img, box = _rect_image()
    labels = np.array([1])
    n_crop = n_exp = n_mir = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out, b, lab = augment.random_crop(img, box, labels, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_crop += out.shape != img.shape
        out, b = augment.expand(img, box, (1, 2, 3), 1.0, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_exp += out.shape != img.shape
        out, b = augment.mirror(img, box, rng)
        np.testing.assert_array_equal(b[0], _red_bbox(out))
        n_mir += not np.array_equal(out, img)
    assert n_crop > 10 and n_exp > 50 and 10 < n_mir < 50


def test_train_augment_deterministic_boxes_in_unit_square():
    rng0 = np.random.default_rng(123)
    img = rng0.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array(
        [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.95, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32
    )
    labels = np.array([1, 2, 3])
    a = augment.train_augment(img, boxes, labels, np.random.default_rng(5), size=32)
    b = augment.train_augment(img, boxes, labels, np.random.default_rng(5), size=32)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    differs = 0
    for seed in range(40):
        out, bx, lab, _ = augment.train_augment(
            img, boxes, labels, np.random.default_rng(seed), size=32
        )
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert len(bx) == len(lab) >= 1
        assert ((bx >= 0) & (bx <= 1)).all() and (bx[:, 2:] > bx[:, :2]).all()
        differs += not np.array_equal(out, a[0])
    assert differs > 30


def test_min_size_filter_falls_back_to_unaugmented_image():
    img = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    # 0.003 wide: even the tightest crop (0.3 * sqrt(2) of the side) keeps it < 0.01
    tiny = np.array([[0.5, 0.5, 0.503, 0.503]], np.float32)
    out, bx, lab, fell_back = augment.train_augment(
        img, tiny, np.array([4]), np.random.default_rng(0), size=32
    )
    assert fell_back
    np.testing.assert_array_equal(bx, tiny)
    assert lab.tolist() == [4]
    assert any(np.array_equal(out, augment.resize(img, 32, f)) for f in augment.INTERPOLATIONS)
    # no boxes: only resized
    out, bx, _, fell_back = augment.train_augment(
        img, np.zeros((0, 4)), np.zeros((0,)), np.random.default_rng(0), size=32
    )
    assert not fell_back and bx.shape == (0, 4)
    assert any(np.array_equal(out, augment.resize(img, 32, f)) for f in augment.INTERPOLATIONS)


def _original_distort(image_rgb, rng):
    """The original's `_distort`, written out literally (float64 copies, truncating uint8
    writes, cv2's HSV on the BGR image) with the same draws from `rng`, in its order."""

    def convert(img, alpha=1.0, beta=0.0):
        tmp = img.astype(float) * alpha + beta
        tmp[tmp < 0] = 0
        tmp[tmp > 255] = 255
        img[:] = tmp

    img = image_rgb[..., ::-1].copy()  # BGR, as cv2.imread gives
    if rng.integers(2):
        convert(img, beta=rng.uniform(-32, 32))
    if rng.integers(2):
        convert(img, alpha=rng.uniform(0.5, 1.5))
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    if rng.integers(2):
        tmp = img[:, :, 0].astype(int) + int(rng.integers(-18, 19))
        img[:, :, 0] = tmp % 180
    if rng.integers(2):
        convert(img[:, :, 1], alpha=rng.uniform(0.5, 1.5))
    return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)[..., ::-1]


def test_photometric_distort_is_the_original_bit_for_bit():
    img = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    changed = 0
    for seed in range(48):  # every combination of the four coin flips, several times
        got = augment.photometric_distort(img, np.random.default_rng(seed))
        want = _original_distort(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, want)
        changed += not np.array_equal(got, img)
    assert changed == 48  # the HSV round trip alone already quantizes


def test_resize_is_cv2_and_normalize():
    img = np.random.default_rng(2).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    for interp in augment.INTERPOLATIONS:
        np.testing.assert_array_equal(
            augment.resize(img, 32, interp), cv2.resize(img, (32, 32), interpolation=interp)
        )
    assert augment.resize(img, (20, 30)).shape == (20, 30, 3)
    np.testing.assert_array_equal(augment.resize(img[:32, :32], 32), img[:32, :32])
    x = normalize(img, "bgr", (104.0, 117.0, 123.0))
    np.testing.assert_array_equal(x[..., 0], img[..., 2].astype(np.float32) - 104.0)


def test_train_augment_boxes_follow_the_pixels():
    """Crop, distortion, expand, mirror and resize together: a white box on black stays
    under its transformed box, and nothing bright is left outside it."""
    img = np.zeros((60, 80, 3), np.uint8)
    img[10:40, 20:50] = 255
    box = np.array([[20 / 80, 10 / 60, 50 / 80, 40 / 60]], np.float32)
    sizes = set()
    for seed in range(80):
        out, b, _, _ = augment.train_augment(
            img, box, np.array([1]), np.random.default_rng(seed), size=64, fill_rgb=(0, 0, 0)
        )
        x1, y1, x2, y2 = b[0] * 64
        sizes.add(round(float(x2 - x1)))
        gray = out[..., 0].astype(int)  # a grey image stays grey through the HSV steps
        inside = np.zeros((64, 64), bool)
        inside[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1] = True
        near = np.zeros((64, 64), bool)
        near[max(int(y1) - 1, 0) : int(np.ceil(y2)) + 1, max(int(x1) - 1, 0) : int(np.ceil(x2)) + 1] = True
        if inside.any():  # white (>= 255 * 0.5 - 32) under the box
            assert (gray[inside] > 70).mean() > 0.97, seed
        assert (gray[~near] < 70).mean() > 0.97, seed  # black (<= 32 * 1.5) elsewhere
    assert len(sizes) > 10  # crops and zoom-outs of many scales were drawn
