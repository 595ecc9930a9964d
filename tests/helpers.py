"""Shared test helpers: paths, detection comparison, tiny random weights, a synthetic batch
source and the subprocess worker runners (imported as `tests.helpers`)."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2det_jax import build_model
from m2det_jax.config import default_config
from m2det_jax.data import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = "tests.train_worker"  # multi-process / signal entry points: python -m WORKER


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name + ".py")


def assert_same_detections(got, want, box_atol=1e-4, score_atol=1e-6, keys=("classes",)):
    """Two detection dicts agree: the same valid rows (and `keys`), boxes and scores close
    on them; `want` must hold some detections (else the comparison proves nothing)."""
    m = np.asarray(want["valid"])
    assert m.sum() > 0
    np.testing.assert_array_equal(got["valid"], m)
    for k in keys:
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_allclose(got["boxes"][m], want["boxes"][m], atol=box_atol)
    np.testing.assert_allclose(got["scores"][m], want["scores"][m], atol=score_atol)


# Small NMS work: the tests are about plumbing, not NMS (tested in tests/test_postprocess_*.py).
OVERRIDES = ["postprocess.keep_per_class=5", "postprocess.candidates_per_class=50"]


def tiny_variables(cfg, seed=0):
    """Random weights without compiling `model.init` (slow on a busy 2-core CPU): kernels
    N(0, 1/fan_in), BN identity; loc kernels x1e-3 (large random regressions overflow exp in
    decode), conf kernels x5 (peaky scores, so some rows pass the thresholds)."""
    model = build_model(cfg)
    s = cfg.model.input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        names = [str(getattr(k, "key", "")) for k in path]
        if len(a.shape) >= 2:
            x = rng.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])), a.shape)
            x *= 1e-3 if names[1].startswith("loc") else 5 if names[1].startswith("conf") else 1
        elif names[-1] in ("bias", "mean"):
            x = np.zeros(a.shape)
        else:
            x = np.ones(a.shape)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def perturbed_variables(cfg, seed=0):
    """`tiny_variables` with non-trivial BatchNorm statistics (scale, mean, var) and biases,
    so that folded biases and the heads' own biases are not zero: a dropped bias shows."""
    rng = np.random.default_rng(seed)

    def perturb(path, a):
        name = str(getattr(path[-1], "key", ""))
        if name in ("scale", "mean", "var"):
            return a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape), a.dtype)
        if name == "bias":
            return a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(perturb, tiny_variables(cfg, seed))



def small_data_config(**data):
    """The default config at input 64 with up to 8 boxes, in-process reading, `data.*`
    overrides."""
    cfg = default_config()
    cfg.model.input_size = 64
    cfg.data.max_boxes = 8
    cfg.data.num_workers = 0
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def stored_records(builder, split):
    """Every stored record of `split` (images still encoded)."""
    src = schema.data_source(builder, split)
    return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------ synthetic batches
class SyntheticIterator:
    """Per-process batches that depend only on (seed, global batch index, process)."""

    def __init__(self, cfg, local_batch_size, process_index=0, process_count=1, seed=0):
        self.cfg, self.bs, self.pi, self.pc, self.seed = (
            cfg, local_batch_size, process_index, process_count, seed)  # fmt: skip
        self.index = 0

    def global_batch(self, index):
        """The whole global batch for `index` (what every process's shards add up to)."""
        s, g = self.cfg.model.input_size, self.cfg.data.max_boxes
        n = self.bs * self.pc
        rng = np.random.default_rng([self.seed, index])
        image = rng.normal(117, 40, (n, s, s, 3)).astype(np.float32)
        xy = rng.uniform(0, 0.6, (n, g, 2))
        wh = rng.uniform(0.1, 0.4, (n, g, 2))
        boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
        labels = rng.integers(1, self.cfg.model.num_classes, (n, g)).astype(np.int32)
        valid = np.arange(g)[None, :] < rng.integers(0, 4, (n, 1))
        for b in range(n):  # paint the boxes so there is something to learn
            for k in np.flatnonzero(valid[b]):
                x1, y1, x2, y2 = (boxes[b, k] * s).astype(int)
                image[b, y1:y2, x1:x2, labels[b, k] % 3] += 100.0
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)  # what the pipeline sends
        return {"image": image, "boxes": boxes, "labels": labels, "valid": valid,
                "mask": np.ones(n, bool)}  # fmt: skip

    def __iter__(self):
        return self

    def __next__(self):
        full = self.global_batch(self.index)
        self.index += 1
        sl = slice(self.pi * self.bs, (self.pi + 1) * self.bs)
        return {k: v[sl] for k, v in full.items()}

    def get_state(self):
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state):
        self.index = json.loads(state)["index"]


def make_synthetic(cfg, process_index=0, process_count=1):
    """A `train_iterator_fn`: this process's slice of synthetic global batches."""
    return SyntheticIterator(cfg, cfg.train.batch_size // process_count, process_index,
                             process_count)  # fmt: skip


# ------------------------------------------------------------------ worker processes


def worker_env() -> dict:
    """Environment for worker subprocesses: the run's persistent compilation cache
    (M2DET_TEST_CACHE, set by conftest), and no XLA_FLAGS of the parent (e.g. fake device
    counts)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def worker_command(*args) -> list[str]:
    return [sys.executable, "-m", WORKER, *map(str, args)]


def run_worker(args, env, timeout=600):
    """`python -m tests.train_worker *args`; asserts it exits 0 and returns the process."""
    p = subprocess.run(worker_command(*args), env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def start_worker_processes(args, nproc, env) -> list[subprocess.Popen]:
    """Starts `python -m tests.train_worker *args ADDR NPROC PID` as `nproc` jax.distributed
    processes on localhost (a free port); stdout and stderr piped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    return [
        subprocess.Popen(worker_command(*args, addr, nproc, i), env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(nproc)
    ]


def run_worker_processes(args, nproc, env, timeout=600) -> list[str]:
    """`start_worker_processes`, then waits; asserts every one exits 0; their stdouts."""
    outs = []
    for p in start_worker_processes(args, nproc, env):
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


# ------------------------------------------------------------------ VOC-format folders
VOC_COLORS = ((220, 40, 40), (40, 200, 40), (40, 60, 230), (230, 200, 30), (200, 40, 200))


def voc_xml(name, width, height, objects) -> str:
    """A PASCAL VOC annotation; objects: (class name, (x1, y1, x2, y2), difficult)."""
    objs = "".join(
        f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b, d in objects
    )
    return (f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename><size>"
            f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{objs}</annotation>")  # fmt: skip


def write_voc_folder(root, classes, splits, size=(96, 80), seed=0, per_image=2):
    """A VOC-format folder of painted boxes: splits {name: number of images}; image ids
    are numbered across splits ("000001", ...). Every image's first box is difficult in
    one image out of four. Returns {image id: [(class, box, difficult), ...]}."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    out, k = {}, 0
    for split, n in splits.items():
        ids = []
        for _ in range(n):
            k += 1
            image_id = f"{k:06d}"
            img = np.full((h, w, 3), 128, np.uint8)
            objects = []
            for j in range(per_image):
                c = int(rng.integers(len(classes)))
                bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
                x1, y1 = int(rng.integers(1, w - bw)), int(rng.integers(1, h - bh))
                box = (x1, y1, x1 + bw, y1 + bh)
                img[y1:y1 + bh, x1:x1 + bw] = VOC_COLORS[c % len(VOC_COLORS)]
                objects.append((classes[c], box, j == 0 and k % 4 == 0))
            cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".jpg"), img[..., ::-1])
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(voc_xml(image_id, w, h, objects))
            out[image_id] = objects
            ids.append(image_id)
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return out


def hold(obj, seconds: float) -> None:
    """A worker process's target: receives `obj` (unpickled there), then sleeps."""
    time.sleep(seconds)
