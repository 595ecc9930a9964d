"""Subprocess entry for multi-device / multi-process / signal tests (see test_train.py).

Run from the repository root (`tests.helpers.worker_command`):
  python -m tests.train_worker mesh OUT.json           # 8 fake devices: sharded == single
  python -m tests.train_worker train WORKDIR STEPS [ADDR NPROC PID] [--nan-at K]
      [--slow SECONDS] [--data SHAPES_DATA_DIR] [--set key=value ...] [--devices N] [--eval]
      # --data: the real grain pipeline on the shapes set (else a synthetic iterator)
  python -m tests.train_worker eval DATA_DIR OUT.json [ADDR NPROC PID]   # plain + TTA eval
  python -m tests.train_worker detect8 OUT.json    # make_detector on 8 fake devices vs 1

JAX settings (fake device count, jax.distributed) come first, so the modules that use JAX
are imported inside the entry points, after them.
"""

import json
import logging
import os
import sys

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "tiny.py")


def _enable_cache():
    import jax

    cache = os.environ.get("M2DET_TEST_CACHE")
    if not cache:  # run by hand, outside pytest
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mesh_check(out_path):
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    _enable_cache()
    import numpy as np

    import m2det_jax
    from m2det_jax import distributed as shd
    from m2det_jax.core.priors import prior_boxes
    from m2det_jax.models import build_model
    from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
    from m2det_jax.train.step import TrainState, make_train_step
    from tests.helpers import SyntheticIterator

    assert len(jax.devices()) == 8
    cfg = m2det_jax.load_config(CONFIG)
    schedule = learning_rate_schedule(cfg, 10)
    model, tx = build_model(cfg), make_optimizer(cfg, schedule)
    batch = SyntheticIterator(cfg, 8).global_batch(0)
    results = {}
    for name, devices in (("single", jax.devices()[:1]), ("mesh8", jax.devices())):
        mesh = shd.make_mesh(devices)
        state = jax.jit(lambda r: TrainState.create(model, tx, cfg, r),
                        out_shardings=shd.replicated(mesh))(jax.random.key(0))  # fmt: skip
        step = jax.jit(make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)),
                       in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
                       out_shardings=(shd.replicated(mesh), shd.replicated(mesh)))  # fmt: skip
        gb = shd.global_batch(batch, mesh)
        if name == "mesh8":
            assert len(gb["image"].sharding.device_set) == 8
        initial_stats = jax.device_get(state.batch_stats)
        new_state, metrics = step(state, gb)
        results[name] = jax.device_get((new_state, metrics))
    a, b = results["single"], results["mesh8"]
    diff = {
        "loss": abs(float(a[1]["loss"]) - float(b[1]["loss"])),
        "params": max(float(np.abs(x - y).max()) for x, y in zip(
            jax.tree.leaves(a[0].params), jax.tree.leaves(b[0].params), strict=False)),
        "batch_stats": max(float(np.abs(x - y).max()) for x, y in zip(
            jax.tree.leaves(a[0].batch_stats), jax.tree.leaves(b[0].batch_stats), strict=False)),
        "bn_moved": max(float(np.abs(x - y).max()) for x, y in zip(
            jax.tree.leaves(a[0].batch_stats), jax.tree.leaves(initial_stats), strict=False)),
        "loss_value": float(a[1]["loss"]),
    }  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(diff, f)


def detect_check(out_path):
    """`make_detector` (plain, TTA of 2 sizes + flip, and with folded BatchNorm) on 8 fake
    devices against 1 device: the detections of both, as JSON."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    _enable_cache()
    import numpy as np

    import m2det_jax
    from m2det_jax import distributed as shd
    from m2det_jax.inference.detector import make_detector
    from tests.helpers import OVERRIDES, tiny_variables

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(3)
    ims = [rng.integers(0, 255, (40 + 7 * i, 90 - 5 * i, 3), np.uint8) for i in range(5)]
    out = {}
    for fold in (False, True):
        # The folded run also takes Winograd convolutions (thresholds low enough for tiny).
        wino = (["eval.winograd=on", "eval.winograd_min_channels=8",
                 "eval.winograd_min_pixels=1"] if fold else ["eval.winograd=off"])  # fmt: skip
        cfg = m2det_jax.load_config(CONFIG, OVERRIDES + [f"eval.fold_batchnorm={fold}",
                                                         "postprocess.score_threshold=0.05",
                                                         *wino])  # fmt: skip
        v = tiny_variables(cfg)
        for tta in (False, True):
            kw = {"tta_sizes": (64, 96), "tta_flip": True} if tta else {}
            for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
                d = make_detector(cfg, v, batch_size=5, mesh=shd.make_mesh(devices), **kw)(ims)
                out[f"{name}_{'tta' if tta else 'plain'}_{'fold' if fold else 'bn'}"] = {
                    k: np.asarray(x).tolist() for k, x in d.items()}
    with open(out_path, "w") as f:
        json.dump(out, f)


class _Faulty:
    """Wraps a train iterator: NaN boxes in global batch `nan_at` (1-based), a pause after
    every batch with `slow`; state and stats are the wrapped iterator's."""

    def __init__(self, inner, nan_at=None, slow=False):
        self.inner, self.nan_at, self.slow = inner, nan_at, slow
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        import time

        import numpy as np

        b = self.inner.__next__()
        pos = getattr(self.inner, "position", None)
        self.count = pos // self.inner.global_batch if pos is not None else self.inner.index
        if self.nan_at is not None and self.count == self.nan_at:
            # Pixels are uint8 (no NaN): NaN boxes make the matched targets, so the loss, NaN.
            b["boxes"] = np.full(b["boxes"].shape, np.nan, np.float32)
        if self.slow:
            time.sleep(self.slow)
        return b

    @property
    def stats(self):
        return getattr(self.inner, "stats", None)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def real_overrides(data_dir):
    """The tiny model on the shapes set the `shapes` test fixture prepares in data_dir."""
    return ["data.dataset=shapes", f"data.data_dir={data_dir}", "data.shapes_num_train=16",
            "data.shapes_num_validation=8", "model.num_classes=5", "data.num_workers=0"]


def train(workdir, steps, addr=None, nproc=None, pid=None, nan_at=None, slow=0.0,
          data_dir=None, sets=(), devices=None, evaluate=False):  # fmt: skip
    import jax

    if devices:  # CPU devices of this process (a 2-device process computes what 2
        jax.config.update("jax_num_cpu_devices", int(devices))  # 1-device processes do)
    if addr:
        jax.distributed.initialize(addr, int(nproc), int(pid), initialization_timeout=60)
    _enable_cache()
    import m2det_jax
    from m2det_jax.train.data_state import tfds_train_data
    from m2det_jax.train.loop import train_and_evaluate
    from tests.helpers import make_synthetic

    overrides = [f"train.num_steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
                 "train.eval_every=-1"] + (real_overrides(data_dir) if data_dir else [])
    cfg = m2det_jax.load_config(CONFIG, overrides + list(sets))
    if data_dir:  # the real grain pipeline of the shapes set
        make, n = tfds_train_data(cfg)
    else:
        make, n = make_synthetic, 64
    r = train_and_evaluate(cfg, workdir, train_iterator_fn=lambda *a: _Faulty(make(*a), nan_at, slow),
                           num_train_examples=n,
                           evaluate_fn=None if evaluate else (lambda c, v, s: {}),
                           progress=False)  # fmt: skip
    print("DONE", r["step"], r["preempted"], flush=True)


EVAL_OVERRIDES = ["postprocess.keep_per_class=5", "postprocess.candidates_per_class=50",
                  "model.num_classes=5", "data.dataset=shapes", "data.eval_batch_size=4",
                  "data.shapes_num_train=16", "data.shapes_num_validation=8",
                  "postprocess.score_threshold=0.05"]  # fmt: skip


def eval_config(data_dir, tta):
    import m2det_jax

    extra = ["tta.sizes=(64,96)", "tta.flip=True"] if tta else []
    return m2det_jax.load_config(CONFIG, [*EVAL_OVERRIDES, f"data.data_dir={data_dir}", *extra])


def evaluate(data_dir, out_path, addr=None, nproc=None, pid=None):
    """Plain and TTA predictions of the shapes validation split and their COCO metrics, as
    process 0 sees them (every process gets all images' detections)."""
    import jax

    if addr:
        jax.distributed.initialize(addr, int(nproc), int(pid), initialization_timeout=60)
    _enable_cache()
    from m2det_jax.evaluation.driver import evaluate_variables
    from m2det_jax.evaluation.stream import predict_split
    from tests.helpers import tiny_variables

    out = {"process_count": jax.process_count()}
    for name, tta in (("plain", False), ("tta", True)):
        cfg = eval_config(data_dir, tta)
        v = tiny_variables(cfg)
        preds = predict_split(cfg, v)
        m = preds["valid"]
        out[name] = {
            "image_id": preds["image_id"].tolist(),
            "num_valid": m.sum(axis=1).tolist(),
            "boxes": preds["boxes"][m].tolist(),
            "scores": preds["scores"][m].tolist(),
            "classes": preds["classes"][m].tolist(),
            "metrics": evaluate_variables(cfg, v),
        }
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump(out, f, default=float)


def _take(args, flag, default=None, many=False):
    """Removes `flag VALUE` (every one with many) from args; its value(s)."""
    values = []
    while flag in args:
        i = args.index(flag)
        values.append(args[i + 1])
        del args[i : i + 2]
    return values if many else (values[-1] if values else default)


if __name__ == "__main__":
    # What `m2det train` shows (resumes, evaluations), on stdout where the tests read it.
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    logging.getLogger("m2det_jax").setLevel(logging.INFO)
    args = sys.argv[1:]
    nan_at = _take(args, "--nan-at")
    slow = float(_take(args, "--slow", 0.0))
    data_dir = _take(args, "--data")
    sets = _take(args, "--set", many=True)
    devices = _take(args, "--devices")
    with_eval = "--eval" in args  # the real COCO evaluation at train.eval_every steps
    args = [a for a in args if a != "--eval"]
    if args[0] == "mesh":
        mesh_check(args[1])
    elif args[0] == "detect8":
        detect_check(args[1])
    elif args[0] == "eval":
        evaluate(*args[1:6])
    else:
        train(args[1], int(args[2]), *args[3:6], nan_at=None if nan_at is None else int(nan_at),
              slow=slow, data_dir=data_dir, sets=sets, devices=devices,
              evaluate=with_eval)
