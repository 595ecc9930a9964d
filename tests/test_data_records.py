"""Record decoding (numpy + PIL, no TFDS) and the layout of `m2det_jax.data`."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from m2det_jax import data
from m2det_jax.data import records
from m2det_jax.data.sources.shapes import encode_png

DATA_DIR = pathlib.Path(data.__file__).parent
# Data-flow order: a module may import only modules listed before it.
ORDER = (
    "records",
    "schema",
    "coco_json",
    "sources/shapes",
    "sources/coco_folder",
    "sources/voc_folder",
    "sources/yolo_folder",
    "builders",
    "augment_host",
    "augment_device",
    "worker_guard",
    "examples",
    "iterator",
    "pipeline",
    "device_feed",
)


def test_decode_record_boxes_labels_and_counts():
    image = np.zeros((30, 40, 3), np.uint8)
    record = {
        "image": np.array(encode_png(image), dtype=object),
        "image/id": np.int64(7),
        "objects": {
            "bbox": np.array(
                [
                    [0.1, 0.2, 0.5, 0.6],  # kept: -> xyxy [0.2, 0.1, 0.6, 0.5]
                    [-0.5, 0.0, 0.5, 1.5],  # clipped
                    [0.3, 0.3, 0.3, 0.9],  # zero height: bad
                    [np.nan, 0.0, 1.0, 1.0],  # non-finite: bad
                    [0.0, 0.0, 1.0, 1.0],  # crowd: dropped
                ],
                np.float32,
            ),
            "label": np.array([0, 1, 2, 3, 4]),
            "is_crowd": np.array([False, False, False, False, True]),
        },
    }
    ex, stats = records.decode_record(record)
    assert set(ex) == {"image", "boxes", "labels", "image_id", "image_sizes"}
    np.testing.assert_array_equal(ex["image"], image)
    np.testing.assert_allclose(ex["boxes"], [[0.2, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 0.5]])
    assert ex["boxes"].dtype == np.float32 and ex["labels"].tolist() == [1, 2]
    assert ex["image_id"] == 7 and ex["image_sizes"].tolist() == [30, 40]
    assert (stats["bad_boxes"], stats["clipped_boxes"], stats["crowd_boxes"]) == (2, 1, 1)
    ex, _ = records.decode_record(record, include_crowd=True)
    assert ex["labels"].tolist() == [1, 2, 5]

    ex, stats = records.decode_record({"image": b"not an image"})
    assert ex is None and stats["bad_images"] == 1 and stats["examples"] == 1
    assert records.image_hw(record["image"]) == (30, 40)
    assert records.image_hw(b"not an image") is None


def test_decode_image_gray_and_arrays():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = records.decode_image(encode_png(np.stack([gray] * 3, -1)))
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == gray).all()
    arr = np.zeros((2, 2, 3), np.uint8)
    assert records.decode_image(arr) is arr
    assert records.decode_image(b"") is None


@pytest.mark.parametrize("params", [
    [cv2.IMWRITE_JPEG_QUALITY, 90],  # 4:2:0, as most photos
    [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
     cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
    [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
    "gray",
])  # fmt: skip
def test_jpeg_decoding_gives_opencvs_pixels(params):
    """The fast JPEG path (simplejpeg) decodes to exactly what cv2.imdecode gives."""
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (6, 8, 3), np.uint8), (160, 120),
                     interpolation=cv2.INTER_CUBIC)  # fmt: skip
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    if params == "gray":
        raw = cv2.imencode(".jpg", img[..., 0])[1].tobytes()
    else:
        raw = cv2.imencode(".jpg", img, params)[1].tobytes()
    assert records._decode_jpeg(raw) is not None  # the fast path took it
    want = cv2.imdecode(np.frombuffer(raw, np.uint8),
                        cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)  # fmt: skip
    np.testing.assert_array_equal(records.decode_image(raw), want)
    # A truncated file is OpenCV's to judge, as before.
    cut = raw[: len(raw) // 2]
    assert records._decode_jpeg(cut) is None
    got, want = records.decode_image(cut), cv2.imdecode(np.frombuffer(cut, np.uint8),
                                                        cv2.IMREAD_COLOR_RGB)  # fmt: skip
    assert (got is None and want is None) or np.array_equal(got, want)


def _imports(module: str) -> tuple[set[str], list[int]]:
    """(m2det_jax.data modules `module` imports, lines of imports inside functions)."""
    tree = ast.parse((DATA_DIR / f"{module}.py").read_text())
    deps, nested = set(), []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if id(node) not in top:
            nested.append(node.lineno)
        deps |= {"/".join(n.split(".")[2:4]) if n.startswith("m2det_jax.data.sources.")
                 else n.split(".")[2] for n in names if n.startswith("m2det_jax.data.")}
    return deps, nested


def test_modules_import_only_upstream_and_at_top_level():
    found = {str(p.relative_to(DATA_DIR))[:-3] for p in DATA_DIR.rglob("*.py")}
    assert found == {"__init__", "sources/__init__", *ORDER}
    for i, module in enumerate(ORDER):
        deps, nested = _imports(module)
        assert deps <= set(ORDER[:i]), (module, deps - set(ORDER[:i]))
        assert not nested, (module, nested)
        assert len((DATA_DIR / f"{module}.py").read_text().splitlines()) <= 400, module


def test_records_and_augment_do_not_import_tfds_or_grain():
    code = (
        "import sys, m2det_jax.data.records, m2det_jax.data.augment_host\n"
        "from m2det_jax.data import decode_image\n"
        "bad = [m for m in ('tensorflow_datasets', 'tensorflow', 'grain') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports():
    want = {
        "open_builder", "annotation_file", "category_ids", "make_train_iterator",
        "make_eval_iterator", "DataStats", "DetectionIterator", "decode_image", "data_source",
        "decode_record", "ground_truth", "class_names", "dataset_labels", "known_labels",
        "train_source", "DevicePrefetch",
    }  # fmt: skip
    assert set(data.__all__) == want
    for name in want:
        assert callable(getattr(data, name)), name
