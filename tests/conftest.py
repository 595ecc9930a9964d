"""Session fixtures; shared helpers live in `tests/helpers.py`."""

import pytest

from m2det_jax.reference import load_fixture


@pytest.fixture(scope="session")
def fixture320():
    return load_fixture()
