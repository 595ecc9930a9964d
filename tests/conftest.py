"""Session fixtures; shared helpers live in `tests/helpers.py`."""

import jax
import pytest
import tensorflow_datasets as tfds

from m2det_jax.data.sources.shapes import build_shapes
from m2det_jax.reference import load_fixture

tfds.disable_progress_bar()


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
