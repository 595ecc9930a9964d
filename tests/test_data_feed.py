"""Feeding the device: uint8 batches normalized on the device by the one `preprocess`,
device prefetch (order and resume state preserved), and test-time preprocessing that is
the original's bit for bit (cv2 decode + INTER_LINEAR resize, minus the means)."""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax import distributed as shd
from m2det_jax import load_config
from m2det_jax.core.preprocess import normalize, preprocess
from m2det_jax.data import augment_host as augment
from m2det_jax.data import pipeline, records
from m2det_jax.data.device_feed import DevicePrefetch
from m2det_jax.data.sources.coco_folder import build_coco_folder
from m2det_jax.inference.detector import prepare_images
from m2det_jax.train.loop import train_and_evaluate
from m2det_jax.train.step import device_inputs
from tests.helpers import OVERRIDES, ROOT, config_path, small_data_config


def _train_iter(builder, cfg=None, **kw):
    cfg = cfg or small_data_config()
    return pipeline.make_train_iterator(cfg, builder=builder, global_batch_size=4,
                                        num_workers=0, shard_index=0, shard_count=1, **kw)  # fmt: skip


def test_device_inputs_normalize_on_device_as_on_host(shapes_builder):
    cfg = small_data_config()
    b = next(_train_iter(shapes_builder, cfg))
    assert b["image"].dtype == np.uint8
    g = shd.global_batch(b, shd.make_mesh())
    assert g["image"].dtype == jnp.uint8  # a quarter of float32's bytes cross to the device
    x, boxes, labels, valid = jax.jit(lambda g: device_inputs(cfg, g, jnp.int32(0)))(g)
    p = cfg.preprocess
    np.testing.assert_array_equal(
        np.asarray(x), normalize(b["image"], p.channel_order, p.pixel_means, p.pixel_scale))
    np.testing.assert_array_equal(np.asarray(boxes), b["boxes"])
    np.testing.assert_array_equal(np.asarray(valid), b["valid"] & b["mask"][:, None])


def test_prefetch_keeps_order_and_resume_state(shapes_builder):
    mesh = shd.make_mesh()
    direct = _train_iter(shapes_builder)
    want, states = [], []
    for _ in range(5):
        want.append(next(direct))
        states.append(direct.get_state())
    for size in (0, 2):
        it = DevicePrefetch(_train_iter(shapes_builder), mesh, size)
        for k in range(3):
            got = next(it)
            assert isinstance(got["image"], jax.Array) and got["image"].dtype == jnp.uint8
            np.testing.assert_array_equal(np.asarray(got["image"]), want[k]["image"])
            np.testing.assert_array_equal(np.asarray(got["image_id"]), want[k]["image_id"])
            # the state of what was handed out, not of what was read ahead
            assert json.dumps(it.get_state()) == json.dumps(states[k])
        it.close()
    resumed = _train_iter(shapes_builder)
    p = DevicePrefetch(resumed, mesh, 2)
    p.set_state(states[2])
    np.testing.assert_array_equal(np.asarray(next(p)["image_id"]), want[3]["image_id"])
    p.close()


class _Failing:
    def __init__(self, n):
        self.n = n

    def __next__(self):
        self.n -= 1
        if self.n < 0:
            raise ValueError("bad record in shard 3")
        return {"image": np.zeros((1, 4, 4, 3), np.uint8)}

    def get_state(self):
        return {"n": self.n}


def test_prefetch_raises_the_iterator_error_in_order():
    it = DevicePrefetch(_Failing(2), shd.make_mesh(), 3)
    next(it), next(it)
    with pytest.raises(ValueError, match="shard 3"):
        next(it)


# ----------------------------------------------------------- the original's test input


def test_reference_image_is_the_original_input_bit_for_bit():
    """The shipped fixture: the original's BaseTransform of a BGR image (cv2 resize)."""
    bgr = np.random.default_rng(320).integers(0, 256, (375, 500, 3), np.uint8)  # image.npy
    want = np.load(os.path.join(ROOT, "m2det_jax", "reference", "m2det320_vgg", "input.npy"))
    cfg = load_config(config_path("m2det320_vgg"))
    x, hw = prepare_images([bgr[..., ::-1]], cfg)  # m2det detect's path, RGB in
    assert x.dtype == np.uint8 and hw.tolist() == [[375, 500]]
    got = np.asarray(jax.jit(lambda x: preprocess(x, cfg))(x))
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), want)


def test_eval_pipeline_on_jpegs_is_cv2_imread_resize_bit_for_bit(tmp_path):
    """JPEG folder -> the eval iterator -> on-device preprocess, against the original's
    cv2.imread + cv2.resize(INTER_LINEAR) + float32 - means, computed with cv2 here."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i, (h, w) in enumerate([(480, 640), (333, 500), (97, 61)]):
        small = rng.integers(0, 256, (5, 7, 3), np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "img" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 20, 20],
                     "area": 400, "iscrowd": 0})  # fmt: skip
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    builder = build_coco_folder(tmp_path / "tfds", image_dir=tmp_path / "img",
                                annotation_file=ann, eval_image_dir=tmp_path / "img",
                                eval_annotation_file=ann)  # fmt: skip
    cfg = load_config(config_path("m2det320_vgg"))
    s = cfg.model.input_size
    it = pipeline.make_eval_iterator(cfg, builder=builder, global_batch_size=4, num_workers=0,
                                     shard_index=0, shard_count=1)  # fmt: skip
    batch = next(it)
    got = np.asarray(jax.jit(lambda x: preprocess(x, cfg))(batch["image"]))
    for k, image_id in enumerate(batch["image_id"][batch["mask"]]):
        bgr = cv2.imread(str(tmp_path / "img" / f"{image_id - 1}.jpg"))
        want = cv2.resize(bgr, (s, s), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        want -= np.array([104, 117, 123], np.float32)
        np.testing.assert_array_equal(got[k], want)
    # m2det detect's decode of the same files agrees too
    raw = (tmp_path / "img" / "1.jpg").read_bytes()
    np.testing.assert_array_equal(records.decode_image(raw)[..., ::-1],
                                  cv2.imread(str(tmp_path / "img" / "1.jpg")))  # fmt: skip
    np.testing.assert_array_equal(augment.resize(records.decode_image(raw), s),
                                  prepare_images([records.decode_image(raw)], cfg)[0][0])  # fmt: skip


def test_train_with_augmentation_on_the_device(shapes, tmp_path):
    """`data.augment_on_device`: the real pipeline sends uint8 canvases with their sizes,
    the jitted step augments, and training (prefetching) runs, checkpoints and resumes."""
    data_dir, builder = shapes
    cfg = load_config(config_path("tiny"), OVERRIDES + [
        f"data.data_dir={data_dir}", "data.dataset=shapes", "data.shapes_num_train=16",
        "data.shapes_num_validation=8", "data.num_workers=0", "data.augment_on_device=True",
        "data.device_canvas=96", "model.num_classes=5", "train.batch_size=4", "train.num_steps=2",
        "train.eval_every=-1", "train.log_every=1", "data.prefetch=2"])  # fmt: skip
    b = next(pipeline.make_train_iterator(cfg, builder=builder, shard_index=0, shard_count=1))
    assert b["image"].shape == (4, 96, 96, 3) and b["image"].dtype == np.uint8
    assert (b["canvas_sizes"] == 96).all()  # 128 px images shrunk to fit the canvas
    assert (b["image"][:, 90:] != 0).any()  # the whole canvas covered
    out = train_and_evaluate(cfg, str(tmp_path / "wd"), progress=False)
    assert out["step"] == 2 and np.isfinite(out["final_metrics"]["loss"])
    cfg.train.num_steps = 3  # resumes: the iterator state saved is that of batch 2
    out = train_and_evaluate(cfg, str(tmp_path / "wd"), progress=False)
    assert out["step"] == 3 and np.isfinite(out["final_metrics"]["loss"])
