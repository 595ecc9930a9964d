import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "train_worker.py")  # multi-process / signal entry points
sys.path.insert(0, os.path.dirname(__file__))


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name + ".py")


@pytest.fixture(scope="session")
def fixture320():
    from m2det_jax.reference import load_fixture

    return load_fixture()


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


def worker_env(cache_dir) -> dict:
    """Environment for `WORKER` subprocesses: a shared persistent compilation cache, and
    no XLA_FLAGS of the parent (e.g. fake device counts)."""
    env = dict(os.environ)
    env["M2DET_TEST_CACHE"] = str(cache_dir)
    env.pop("XLA_FLAGS", None)
    return env


def run_worker(args, env, timeout=600):
    """`python train_worker.py *args`; asserts it exits 0 and returns the completed process."""
    p = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=TESTS)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def run_worker_processes(args, nproc, env, timeout=600):
    """`python train_worker.py *args ADDR NPROC PID` as `nproc` jax.distributed processes
    on localhost (a free port); asserts every one exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen([sys.executable, WORKER, *args, addr, str(nproc), str(i)], env=env,
                         cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(nproc)
    ]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
