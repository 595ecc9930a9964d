"""`m2det export`: inference checkpoint (float32 / bfloat16), the jax.export serving
artefact and the TF SavedModel reloaded and compared with in-process JAX; `m2det benchmark`
prints its table."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from m2det_jax import build_model, detect, load_config, prior_boxes
from m2det_jax.checkpoints.variables import load_variables, read_labels, save_variables
from m2det_jax.core.preprocess import normalize
from m2det_jax.inference.export import export, load_saved_model, load_serving
from m2det_jax.inference.postprocess import standard_postprocess
from tests.helpers import OVERRIDES, assert_same_detections, config_path, tiny_variables


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(config_path("tiny"), OVERRIDES)
    v = tiny_variables(cfg)
    ckpt = save_variables(tmp_path_factory.mktemp("ckpt") / "vars", v, cfg, source="test",
                          labels=LABELS)  # fmt: skip
    return cfg, v, ckpt


LABELS = {"class_names": ["a", "b", "c"], "category_ids": [3, 7, 9]}


def test_export_cli_round_trip(setup, tmp_path):
    from m2det_jax.cli import main

    cfg, v, ckpt = setup
    out = tmp_path / "export"
    rc = main(
        [
            "export",
            "--config",
            config_path("tiny"),
            *("--config." + o for o in OVERRIDES),
            "--checkpoint",
            str(ckpt),
            "--output",
            str(out),
            "--serving",
            "jax",
        ]
    )
    assert rc == 0
    meta = json.loads((out / "serving.json").read_text())
    assert meta["format"] == "jax" and meta["batch"] == "b" and meta["input_size"] == 64
    # Inference checkpoint: params + batch_stats, identical values; the export folder
    # itself loads (m2det eval / detect --checkpoint OUT), with the source's labels.
    for where in (out / "variables", out):
        got = load_variables(where, cfg)
        assert set(got) == {"params", "batch_stats"}
        jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(v))
        assert read_labels(where) == LABELS
    assert meta["labels"] == LABELS
    # Serving artefact (symbolic batch): 3 images, compared with the in-process network.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64, 3), np.uint8)
    hw = np.array([[100, 200], [64, 64], [30, 41]], np.float32)
    served = jax.device_get(load_serving(os.path.join(out, "serving.jax_export"))(images, hw))
    _assert_same_detections(served, _reference(cfg, v, images, hw))


def _reference(cfg, v, images, hw):
    """The network and `detect` on inputs normalized on the host, with numpy."""
    p = cfg.preprocess
    x = normalize(images, p.channel_order, p.pixel_means, p.pixel_scale)
    out = jax.jit(functools.partial(build_model(cfg).apply, train=False))(v, x)
    return jax.device_get(detect(out["loc"], out["logits"], prior_boxes(cfg), cfg, hw))


def _assert_same_detections(served, ref):
    assert_same_detections(served, ref, keys=("classes", "num_dropped"))


# Needs TensorFlow (the savedmodel extra, which the test extra includes): never skipped;
# a run without it deselects the marker (`-m "not tensorflow"`).
@pytest.mark.tensorflow
def test_saved_model_round_trip(setup, tmp_path):
    """`--serving savedmodel`: a TF SavedModel (fixed batch 2) reloaded by TensorFlow gives
    the in-process detections; its signature carries the fixed shapes."""
    from m2det_jax.cli import main

    cfg, v, ckpt = setup
    out = tmp_path / "export"
    args = ["export", "--config", config_path("tiny"), *("--config." + o for o in OVERRIDES)]
    args += ["--checkpoint", str(ckpt), "--output", str(out), "--serving", "savedmodel"]
    assert main([*args, "--batch", "2"]) == 0
    meta = json.loads((out / "serving.json").read_text())
    assert meta["format"] == "savedmodel" and meta["batch"] == "2"
    fn = load_saved_model(str(out / "saved_model"))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, 64, 64, 3), np.uint8)
    hw = np.array([[100, 200], [30, 41]], np.float32)
    served = fn(images, hw)
    assert set(served) == {"boxes", "scores", "classes", "valid", "num_dropped", "num_tie_dropped"}
    _assert_same_detections(served, _reference(cfg, v, images, hw))
    import tensorflow as tf

    with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
        fn(images[:1], hw[:1])  # the batch is fixed


def test_bf16_inference_checkpoint(setup, tmp_path):
    cfg, v, _ = setup
    export(cfg, v, str(tmp_path), bf16=True, serving="none")
    got = load_variables(tmp_path / "variables", cfg)
    assert {str(a.dtype) for a in jax.tree.leaves(got)} == {"float32"}
    want = jax.tree.map(
        lambda a: np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), jax.device_get(v)
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_benchmark_cli_prints_table(setup, capsys):
    from m2det_jax.cli import main

    _, _, ckpt = setup
    rc = main(
        [
            "benchmark",
            "--config",
            config_path("tiny"),
            *("--config." + o for o in OVERRIDES),
            "--checkpoint",
            str(ckpt),
            "--batch",
            "2",
            "--iters",
            "1",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split() for line in text.splitlines()[3:]}
    paper = rows["paper: batch 1, net + NMS"]
    assert float(paper[-2]) == pytest.approx(1e3 / float(paper[-3]), rel=0.06)  # FPS = 1/time
    thr = rows["throughput: batch 2"]
    assert float(thr[-2]) == pytest.approx(1e3 / float(thr[-3]), rel=0.06)  # img/s = 1/time
    # The post-processing rows count what `detect` keeps on the benchmark's image (random
    # pixels, seed 0) through this checkpoint, for the config's and the standard settings.
    cfg, v, _ = setup
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), np.uint8)
    for label, c in (("postprocess only: original", cfg),
                     ("postprocess only: standard", standard_postprocess(cfg))):  # fmt: skip
        hw = np.full((1, 2), 64.0, np.float32)
        want = int(_reference(c, v, image, hw)["valid"].sum())
        assert rows[label][-2:] == [str(want), "dets"], (label, rows[label], want)
