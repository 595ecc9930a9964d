"""Session fixtures; shared helpers live in `tests/helpers.py`."""

import os
import shutil
import tempfile

import jax
import pytest
import tensorflow_datasets as tfds

from m2det_jax.data.sources.shapes import build_shapes
from m2det_jax.reference import load_fixture

tfds.disable_progress_bar()

# One persistent XLA compilation cache for the whole run: both xdist workers and every
# worker subprocess (`helpers.worker_env`) read and fill it, so a program that several test
# modules (or processes) compile is built once; `jax.clear_caches()` after each module
# then costs a disk read instead of a compile. A fresh folder per run (never reused: the
# suite's time is what a clean machine sees), removed at the end.
CACHE_ENV = "M2DET_TEST_CACHE"
_OWN_CACHE = False


def pytest_configure(config):
    global _OWN_CACHE
    if CACHE_ENV not in os.environ:  # the first process of the run (xdist's controller)
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="m2det_jax_xla_cache_")
        _OWN_CACHE = True
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session")
def fixture320():
    return load_fixture()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """(data_dir, builder) of a small shapes set: 16 train, 8 validation images."""
    d = tmp_path_factory.mktemp("tfds")
    return d, build_shapes(d, num_train=16, num_validation=8)


@pytest.fixture(scope="session")
def shapes_builder(shapes):
    return shapes[1]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module: one process runs the whole
    suite, and hundreds of cached XLA:CPU executables (each with its buffers) add up."""
    yield
    jax.clear_caches()


# Run first under `pytest -n 2 --dist loadfile` (each module stays on one worker): the
# longest module then overlaps the rest of the suite instead of running alone at the end.
FIRST = ("test_train_reliability.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: order kept otherwise
