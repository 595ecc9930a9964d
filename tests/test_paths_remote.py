"""Paths on any filesystem and throughput in the train log.

* `paths.as_path` keeps URIs (`gs://b/run`) and makes local paths absolute;
* a `gs://` backend mapped onto a local folder (no network): the run files, TensorBoard
  events, exports, `m2det detect` output, COCO-format folders and annotation files go
  through epath to it;
* training on the real pipeline from a prepared dataset folder writes nothing into that
  folder (it may be read-only or shared), evaluates against ground truth built in memory
  and logs images/s, step time and MFU.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from m2det_jax import load_config
from m2det_jax.config import default_config
from m2det_jax.data import coco_json
from m2det_jax.data.sources import coco_folder
from m2det_jax.evaluation.coco import coco_evaluate
from m2det_jax.paths import as_str, is_uri, join
from m2det_jax.perf.costs import train_step_cost
from m2det_jax.train.loop import train_and_evaluate
from m2det_jax.train.writers import MetricsLog, write_run_info
from tests.helpers import OVERRIDES, config_path


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    assert as_str("gs://bucket/run") == "gs://bucket/run"
    assert os.fspath(join("gs://bucket/run", "checkpoints")) == "gs://bucket/run/checkpoints"
    assert is_uri("s3://b/x") and not is_uri("/tmp/x") and not is_uri("relative/gs:/x")
    monkeypatch.chdir(tmp_path)
    assert as_str("run") == os.path.join(str(tmp_path), "run")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert as_str("~/x") == str(tmp_path / "home" / "x")


class _MappedBackend:
    """epath backend for `gs://...` that stores objects under a local folder."""

    def __init__(self, root):
        self.root, self.os = str(root), epath_backend.os_backend

    def local(self, p) -> str:
        s = os.fspath(p)
        assert s.startswith("gs://"), s
        return os.path.join(self.root, s[len("gs://"):])

    def remote(self, p: str) -> str:
        return "gs://" + os.path.relpath(p, self.root)

    def open(self, path, mode):
        if "w" in mode or "a" in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return self.os.open(self.local(path), mode)

    def glob(self, path):
        return [self.remote(p) for p in self.os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in self.os.walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.remote(d), dirs, files

    def rename(self, path, dst):
        self.os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        self.os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        self.os.copy(self.local(path), self.local(dst), overwrite)

    def __getattr__(self, name):  # exists, isdir, listdir, makedirs, mkdir, remove, stat, ...
        fn = getattr(self.os, name)
        return lambda path, *a, **k: fn(self.local(path), *a, **k)


@pytest.fixture
def gs(tmp_path, monkeypatch):
    """`gs://` served from `tmp_path/gcs` (TensorFlow's gfile, if installed, not used)."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _MappedBackend(root))
    return root


def test_run_files_and_tensorboard_go_to_gs(gs):
    cfg = default_config()
    write_run_info("gs://bucket/run", cfg)
    write_run_info("gs://bucket/run", cfg)  # a resumed run adds one command line
    assert json.loads((gs / "bucket/run/config.json").read_text())["model"]["input_size"] == 320
    assert len((gs / "bucket/run/command.txt").read_text().splitlines()) == 2

    log = MetricsLog("gs://bucket/run", enabled=True)
    log.write(1, {"loss": 3.0})
    log.close()
    log = MetricsLog("gs://bucket/run", enabled=True)  # resumed: rows kept, object rewritten
    log.write(2, {"loss": 2.0, "mfu": 0.5})
    log.close()
    rows = [json.loads(s) for s in (gs / "bucket/run/metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "mfu": 0.5}]
    events = list((gs / "bucket/run/tensorboard").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)
    assert sum(e.stat().st_size for e in events) > 100
    assert not os.path.exists("gs:")  # nothing went to a local ./gs:/ folder


def test_export_detect_and_annotations_on_gs(gs, tmp_path):
    from m2det_jax import Detector
    from m2det_jax.inference.export import export_jax, load_serving
    from m2det_jax.inference.image_files import detect_files
    from tests.helpers import tiny_variables

    cfg = load_config(config_path("tiny"), OVERRIDES)
    variables = tiny_variables(cfg)
    export_jax(cfg, variables, "gs://bucket/export/serving.jax", 1)
    assert (gs / "bucket/export/serving.jax").stat().st_size > 1000
    fn = load_serving("gs://bucket/export/serving.jax")
    out = fn(np.zeros((1, 64, 64, 3), np.uint8), np.full((1, 2), 64, np.float32))
    assert np.asarray(out["boxes"]).shape[0] == 1

    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    res = detect_files(Detector(cfg, variables, score_threshold=0.0), str(tmp_path / "a.jpg"),
                       "gs://bucket/det", log=lambda s: None)  # fmt: skip
    assert [r["output"] for r in res] == ["a.jpg"]
    with Image.open(gs / "bucket/det/a.jpg") as im:
        assert im.size == (50, 40)
    assert json.loads((gs / "bucket/det/detections.json").read_text())[0]["width"] == 50


def test_coco_folder_and_annotation_file_read_from_gs(gs, shapes_builder):
    gt = coco_json.ground_truth(shapes_builder, "validation")
    (gs / "bucket/ann").mkdir(parents=True)
    (gs / "bucket/ann/val.json").write_text(json.dumps(gt))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in gt["annotations"]]  # fmt: skip
    m = coco_evaluate("gs://bucket/ann/val.json", results)
    assert m["AP"] == pytest.approx(1.0)

    c = coco_folder.coco_folder_config("gs://bucket/images", "gs://bucket/ann/val.json")
    assert c.image_dir == "gs://bucket/images" and c.annotation_file == "gs://bucket/ann/val.json"
    assert coco_folder.resolve_image_path(c.image_dir, "x/y.jpg") == "gs://bucket/images/x/y.jpg"
    with pytest.raises(ValueError, match="'..' is refused"):
        coco_folder.resolve_image_path(c.image_dir, "../y.jpg")
    assert coco_folder._categories(c.annotation_file)[0] == [1, 2, 3, 4]


def _snapshot(folder) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def test_training_from_a_prepared_folder_writes_nothing_there_and_logs_mfu(
    tmp_path, shapes_builder
):
    # A prepared TFDS folder (as coco/2017 would be): the records only, no instances JSON.
    data_dir = tmp_path / "prepared"
    name = f"{shapes_builder.name}/{shapes_builder.builder_config.name}"
    shutil.copytree(shapes_builder.data_dir, data_dir / name / str(shapes_builder.version))
    before = _snapshot(data_dir)
    os.chmod(data_dir, 0o555)  # read-only for users (root ignores it: hence the snapshot)
    try:
        cfg = load_config(config_path("tiny"), [
            *OVERRIDES, f"data.dataset={name}", f"data.data_dir={data_dir}",
            "model.num_classes=5", "train.batch_size=4", "train.num_steps=4",
            "train.log_every=2", "train.checkpoint_every=4", "train.peak_tflops=1.0",
            "data.eval_batch_size=4", "train.eval_every=0"])  # fmt: skip
        out = train_and_evaluate(cfg, str(tmp_path / "run"), progress=False)
    finally:
        os.chmod(data_dir, 0o755)
    assert _snapshot(data_dir) == before
    assert out["step"] == 4
    final = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    assert final["step"] == 4 and final["num_images"] == 8 and 0.0 <= final["AP50"] <= 1.0

    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for r in train_rows:
        assert r["images_per_sec"] > 0 and r["step_time"] > 0
        # Against the configured peak of 1 TFLOP/s: mfu = achieved TFLOP/s / 1.
        assert r["mfu"] == pytest.approx(r["device_tflops"])
        assert 0 < r["mfu"] < 1
    # device_tflops x step_time is the FLOPs the meter credits each step with: the compiled
    # step's, what `m2det benchmark --train` reports (which has no device-side augmentation
    # and no mesh, hence the margin). A meter counting another program (or per device
    # instead of per step) is off by far more.
    want = train_step_cost(cfg, 4, forward=False)["step_flops_per_image"] * 4
    for r in train_rows:
        assert r["device_tflops"] * 1e12 * r["step_time"] == pytest.approx(want, rel=0.2)
