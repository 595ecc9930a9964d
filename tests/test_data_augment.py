"""Augmentation (crop, expand, mirror, photometric, min-size fallback) and eval preprocessing."""

from __future__ import annotations

import colorsys

import numpy as np

from m2det_jax.data import augment
from m2det_jax.preprocess import normalize


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


def test_hsv_matches_opencv_convention():
    px = np.random.default_rng(1).integers(0, 256, (500, 1, 3), dtype=np.uint8)
    hsv = augment.rgb_to_hsv_cv2(px)
    for p, q in zip(px[:, 0], hsv[:, 0], strict=True):
        h, s, v = colorsys.rgb_to_hsv(*(p / 255.0))
        assert abs(int(q[0]) - round(h * 180) % 180) <= 1 or {int(q[0]), round(h * 180)} == {0, 180}
        assert abs(int(q[1]) - round(s * 255)) <= 1 and int(q[2]) == round(v * 255)
    back = augment.hsv_to_rgb_cv2(hsv).astype(int)
    assert np.abs(back - px).max() <= 5  # uint8 HSV quantization, as in cv2


def test_resize_bilinear_and_normalize():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    np.testing.assert_array_equal(augment.resize_bilinear(img, 4), img)
    half = augment.resize_bilinear(img, 2)  # half-pixel centres: mean of 2x2 blocks
    want = img.reshape(2, 2, 2, 2, 3).astype(float).mean((1, 3))
    np.testing.assert_array_equal(half, np.round(want))
    x = normalize(img, "bgr", (104.0, 117.0, 123.0))
    np.testing.assert_array_equal(x[..., 0], img[..., 2].astype(np.float32) - 104.0)
